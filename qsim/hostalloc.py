"""QEMU's qcow2 host-cluster allocator, exactly (block/qcow2-refcount.c), as small numba functions.

Where new data clusters and L2 tables land in the image file decides host contiguity, and host contiguity decides
how many L2 lookups later reads and writes cost. QEMU allocates first-fit from ``free_cluster_index`` (0 at open),
creates a refcount block on demand when an allocation reaches host clusters no refcount block covers yet (placing it
at the first free cluster at that moment, then retrying the allocation), and reverts partial refcount updates on
retry. These functions follow alloc_clusters_noref, update_refcount, alloc_refcount_block, qcow2_alloc_clusters
and qcow2_alloc_clusters_at step for step, on a byte-per-cluster "refcount > 0" map.

State (int64 array ``alloc``): FREE_INDEX, REFBLOCK_BITS (log2 refcounts per block), REFBLOCKS_MADE,
REFTABLE_ENTRIES, UNMODELLED (set when the refcount table would have to grow: QEMU then relocates it, qsim does not),
HIGH_WATER (one past the last used host cluster).
"""

from __future__ import annotations

import numpy as np
from numba import njit

FREE_INDEX, REFBLOCK_BITS, REFBLOCKS_MADE, REFTABLE_ENTRIES, UNMODELLED, HIGH_WATER, OVERFLOW = range(7)
ALLOC_STATE_SIZE = 8
EAGAIN = -11


def new_alloc_state(cluster_size: int, refcount_bits: int) -> np.ndarray:
    state = np.zeros(ALLOC_STATE_SIZE, dtype=np.int64)
    state[REFBLOCK_BITS] = int(np.log2(cluster_size * 8 // refcount_bits))
    state[REFTABLE_ENTRIES] = cluster_size // 8  # a new image has a one-cluster refcount table
    return state


@njit(cache=True)
def _is_used(used, cluster):
    return cluster < used.shape[0] and used[cluster] != 0


@njit(cache=True)
def _set_used(used, alloc, cluster, value):
    if cluster >= used.shape[0]:
        alloc[OVERFLOW] = 1  # the caller sized the map too small; reported, never written out of bounds
        return
    used[cluster] = value
    if value and cluster + 1 > alloc[HIGH_WATER]:
        alloc[HIGH_WATER] = cluster + 1


@njit(cache=True)
def alloc_clusters_noref(used, alloc, n):
    """First n free clusters in a row from free_cluster_index; advances it past them (no refcount change)."""
    while True:
        restart = False
        for _ in range(n):
            index = alloc[FREE_INDEX]
            alloc[FREE_INDEX] += 1
            if _is_used(used, index):
                restart = True
                break
        if not restart:
            return alloc[FREE_INDEX] - n


@njit(cache=True)
def _alloc_refcount_block(used, covered, alloc, cluster):
    """A new refcount block for ``cluster``'s range, at the first free cluster; QEMU then answers -EAGAIN."""
    block_index = cluster >> alloc[REFBLOCK_BITS]
    if block_index >= alloc[REFTABLE_ENTRIES]:
        alloc[UNMODELLED] = 1  # QEMU would grow and move the refcount table here
    new_block = alloc_clusters_noref(used, alloc, 1)
    covered[block_index] = 1
    new_block_index = new_block >> alloc[REFBLOCK_BITS]
    if new_block_index != block_index and covered[new_block_index] == 0:
        covered[new_block_index] = 1  # QEMU recurses here (a block describing another block); rare, not modelled
        alloc[UNMODELLED] = 1
    _set_used(used, alloc, new_block, 1)
    alloc[REFBLOCKS_MADE] += 1
    return EAGAIN


@njit(cache=True)
def update_refcount(used, covered, alloc, first, n, addend):
    """Set (addend 1) or clear (addend -1) clusters [first, first+n); -EAGAIN after creating a refcount block, with
    the clusters already updated reverted, as QEMU's error path does."""
    for cluster in range(first, first + n):
        block_index = cluster >> alloc[REFBLOCK_BITS]
        if block_index >= covered.shape[0]:
            alloc[OVERFLOW] = 1
            return 0
        if covered[block_index] == 0:
            ret = _alloc_refcount_block(used, covered, alloc, cluster)
            if alloc[FREE_INDEX] > first:  # "try the same ones first to see if they're still free"
                alloc[FREE_INDEX] = first
            for done in range(first, cluster):  # revert
                _set_used(used, alloc, done, 0 if addend > 0 else 1)
                if addend > 0 and done < alloc[FREE_INDEX]:
                    alloc[FREE_INDEX] = done
            return ret
        if addend > 0:
            _set_used(used, alloc, cluster, 1)
        else:
            _set_used(used, alloc, cluster, 0)
            if cluster < alloc[FREE_INDEX]:
                alloc[FREE_INDEX] = cluster
    return 0


@njit(cache=True)
def alloc_clusters(used, covered, alloc, n):
    """qcow2_alloc_clusters: first host cluster of n newly allocated, contiguous clusters."""
    while True:
        first = alloc_clusters_noref(used, alloc, n)
        if update_refcount(used, covered, alloc, first, n, 1) != EAGAIN:
            return first


@njit(cache=True)
def alloc_clusters_at(used, covered, alloc, first, n):
    """qcow2_alloc_clusters_at: allocate up to n clusters exactly at ``first``; how many it got (0 if taken)."""
    if n == 0:
        return 0
    while True:
        free = 0
        while free < n and not _is_used(used, first + free):
            free += 1
        if update_refcount(used, covered, alloc, first, free, 1) != EAGAIN:
            return free


@njit(cache=True)
def free_cluster(used, covered, alloc, cluster):
    update_refcount(used, covered, alloc, cluster, 1, -1)
