"""QEMU's qcow2 host-cluster allocator, exactly (block/qcow2-refcount.c), as small numba functions.

Where new data clusters and L2 tables land in the image file decides host contiguity, and host contiguity decides
how many L2 lookups later reads and writes cost. QEMU allocates first-fit from ``free_cluster_index`` (0 at open),
creates a refcount block on demand when an allocation reaches host clusters no refcount block covers yet (placing it
at the first free cluster at that moment, then retrying the allocation), and reverts partial refcount updates on
retry. These functions follow alloc_clusters_noref, update_refcount, alloc_refcount_block, qcow2_alloc_clusters
and qcow2_alloc_clusters_at step for step, on a byte-per-cluster "refcount > 0" map.

When the refcount table itself is full, alloc_refcount_block grows it as QEMU does (qcow2_refcount_area): new
refcount blocks and a larger table at the next refcount-block boundary past the image's end, covering themselves,
and the old table's clusters freed (the next allocations fill that hole first).

State (int64 array ``alloc``): FREE_INDEX, REFBLOCK_BITS (log2 refcounts per block), REFBLOCKS_MADE,
REFTABLE_ENTRIES, UNMODELLED (unused now: the table's growth and the recursion are modelled), HIGH_WATER (one past
the last used host cluster), REFTABLE_CLUSTER (where the refcount table is), REFTABLE_GROWN (how many times it
moved), CLUSTER_BITS, ALLOCATED_AT_OPEN (the image file's allocated bytes, st_blocks * 512, when QEMU opens it:
what the preallocation scan's threshold comes from), FILE_CLUSTERS_AT_OPEN (its length in clusters then),
USED_DELTA (clusters set used minus cleared since the open).

The refcount-block cache operations QEMU does on the way are logged (``rlog``, rows of RL_KEY refcount block index,
RL_KIND codes.R_*, RL_REPEAT, RL_AT; ``rst``: RS_COUNT rows, RS_AT the caller's L2 event count stamped on each row,
RS_L2_FLUSHES the L2-cache flushes asked for, counted even when not recording): one R_GET per qcow2_get_refcount of
a cluster a refcount block covers (consecutive ones of one block are one row with a repeat count), R_GET_DIRTY per
update_refcount run in one block, R_GET_EMPTY for a new block, R_FLUSH for qcow2_cache_flush of the refcount
cache, R_RC_DEPENDS for a refcount decrease (qcow2_cache_set_dependency(refcount, L2)), R_L2_FLUSH where
alloc_refcount_block flushes the L2 cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .codes import R_FLUSH, R_GET, R_GET_DIRTY, R_GET_EMPTY, R_L2_FLUSH, R_RC_DEPENDS

(FREE_INDEX, REFBLOCK_BITS, REFBLOCKS_MADE, REFTABLE_ENTRIES, UNMODELLED, HIGH_WATER, OVERFLOW, REFTABLE_CLUSTER,
 REFTABLE_GROWN, CLUSTER_BITS, ALLOCATED_AT_OPEN, FILE_CLUSTERS_AT_OPEN, USED_DELTA) = range(13)
ALLOC_STATE_SIZE = 13
RL_KEY, RL_KIND, RL_REPEAT, RL_AT = range(4)
RLOG_WIDTH = 4
RS_COUNT, RS_AT, RS_L2_FLUSHES = range(3)
RST_SIZE = 3
REFTABLE_ENTRY_BYTES = 8
EAGAIN = -11


def new_alloc_state(cluster_size: int, refcount_bits: int) -> np.ndarray:
    state = np.zeros(ALLOC_STATE_SIZE, dtype=np.int64)
    state[REFBLOCK_BITS] = int(np.log2(cluster_size * 8 // refcount_bits))
    state[REFTABLE_ENTRIES] = cluster_size // REFTABLE_ENTRY_BYTES  # a new image: a one-cluster table at cluster 1
    state[REFTABLE_CLUSTER] = 1
    state[CLUSTER_BITS] = cluster_size.bit_length() - 1
    return state


def no_log() -> tuple[np.ndarray, np.ndarray]:
    """An empty refcount log (nothing recorded) and its state."""
    return np.zeros((0, RLOG_WIDTH), np.int64), np.zeros(RST_SIZE, np.int64)


@njit(cache=True)
def log(rlog, rst, key, kind, repeat):
    """One refcount-cache operation; R_GETs of one block with no L2 event between them merge into one row."""
    if rlog.shape[0] == 0:
        return
    n = rst[RS_COUNT]
    if kind == R_GET and n > 0:
        last = rlog[n - 1]
        if last[RL_KIND] == R_GET and last[RL_KEY] == key and last[RL_AT] == rst[RS_AT]:
            last[RL_REPEAT] += repeat
            return
    row = rlog[n]
    row[RL_KEY] = key
    row[RL_KIND] = kind
    row[RL_REPEAT] = repeat
    row[RL_AT] = rst[RS_AT]
    rst[RS_COUNT] = n + 1


@njit(cache=True)
def log_l2_flush(rlog, rst):
    rst[RS_L2_FLUSHES] += 1
    log(rlog, rst, 0, R_L2_FLUSH, 1)


@njit(cache=True)
def log_lookups(covered, alloc, rlog, rst, first, end):
    """qcow2_get_refcount of every cluster in [first, end), logged: one R_GET row per refcount block the table
    has, repeated once per cluster it covers there (what one get_refcount per cluster logs, at a fraction of the
    cost: the allocator's searches and the preallocation scan walk millions of clusters)."""
    if rlog.shape[0] == 0 or end <= first:
        return
    bits = alloc[REFBLOCK_BITS]
    for block in range(first >> bits, ((end - 1) >> bits) + 1):
        if block < alloc[REFTABLE_ENTRIES] and block < covered.shape[0] and covered[block]:
            lo = max(first, block << bits)
            hi = min(end, (block + 1) << bits)
            log(rlog, rst, block, R_GET, hi - lo)


@njit(cache=True)
def get_refcount(used, covered, alloc, rlog, rst, cluster):
    """qcow2_get_refcount: one lookup of the covering block when the refcount table has one; refcount > 0."""
    index = cluster >> alloc[REFBLOCK_BITS]
    if index < alloc[REFTABLE_ENTRIES] and index < covered.shape[0] and covered[index]:
        log(rlog, rst, index, R_GET, 1)
    return _is_used(used, cluster)


@njit(cache=True)
def _is_used(used, cluster):
    return cluster < used.shape[0] and used[cluster] != 0


@njit(cache=True)
def _set_used(used, alloc, cluster, value):
    if cluster >= used.shape[0]:
        alloc[OVERFLOW] = 1  # the caller sized the map too small; reported, never written out of bounds
        return
    if used[cluster] != value:
        alloc[USED_DELTA] += 1 if value else -1
    used[cluster] = value
    if value and cluster + 1 > alloc[HIGH_WATER]:
        alloc[HIGH_WATER] = cluster + 1


@njit(cache=True)
def _set_range(used, alloc, first, end, value):
    """_set_used of clusters [first, end), with the state's counters updated once."""
    stop = min(end, used.shape[0])
    changed = 0
    for cluster in range(first, stop):
        changed += used[cluster] != value
        used[cluster] = value
    alloc[USED_DELTA] += changed if value else -changed
    if value and stop > max(first, alloc[HIGH_WATER]):
        alloc[HIGH_WATER] = stop
    if end > stop:
        alloc[OVERFLOW] = 1  # as _set_used


@njit(cache=True)
def alloc_clusters_noref(used, covered, alloc, rlog, rst, n):
    """First n free clusters in a row from free_cluster_index; advances it past them (no refcount change). QEMU
    takes candidates one by one, restarting after each used one, with one qcow2_get_refcount per candidate: the
    candidates are every cluster from free_cluster_index to the end of the run found, so this scans for the run
    directly and logs them in one go (tests/test_refcount_blocks.py holds it to the candidate-by-candidate loop)."""
    start = alloc[FREE_INDEX]
    size = used.shape[0]  # (clusters past the map are free)
    first = start
    while True:
        while first < size and used[first] != 0:
            first += 1
        end = first
        limit = min(first + n, size)
        while end < limit and used[end] == 0:
            end += 1
        if end == limit:
            break
        first = end + 1  # a used cluster inside the run: the search restarts after it
    alloc[FREE_INDEX] = first + n
    log_lookups(covered, alloc, rlog, rst, start, first + n)
    return first


@njit(cache=True)
def _alloc_refcount_block(used, covered, alloc, rlog, rst, cluster):
    """A new refcount block for ``cluster``'s range, at the first free cluster; when the refcount table has no entry
    for it, the table grows (qcow2_refcount_area). QEMU then answers -EAGAIN.

    When that first free cluster lies in another range no block covers yet, QEMU's update_refcount of it recurses:
    the block for *that* range is made (at the next free cluster, by the same rules), and this call gives up with
    -EAGAIN, leaving the cluster free and ``cluster``'s range uncovered until the caller's retry."""
    bits = alloc[REFBLOCK_BITS]
    while True:
        log_l2_flush(rlog, rst)  # "We write to the refcount table, so we might depend on L2 tables"
        new_block = alloc_clusters_noref(used, covered, alloc, rlog, rst, 1)
        new_block_index = new_block >> bits
        if new_block_index == cluster >> bits or new_block_index >= covered.shape[0] or covered[new_block_index]:
            break
        cluster = new_block
    block_index = cluster >> bits
    if block_index >= covered.shape[0]:
        alloc[OVERFLOW] = 1
        return EAGAIN
    if new_block_index != block_index:  # described by another (existing) block: update_refcount, then a flush
        log(rlog, rst, new_block_index, R_GET_DIRTY, 1)
        log(rlog, rst, 0, R_FLUSH, 1)
    covered[block_index] = 1
    _set_used(used, alloc, new_block, 1)
    alloc[REFBLOCKS_MADE] += 1
    log(rlog, rst, block_index, R_GET_EMPTY, 1)
    log(rlog, rst, 0, R_FLUSH, 1)
    if block_index >= alloc[REFTABLE_ENTRIES]:
        per_block = np.int64(1) << bits
        blocks_used = (max(cluster, new_block) + per_block) // per_block
        _refcount_area(used, covered, alloc, rlog, rst, blocks_used * per_block)
        log(rlog, rst, block_index, R_GET, 1)  # load_refcount_block(new_block)
    return EAGAIN


@njit(cache=True)
def refcount_metadata_blocks(clusters, cluster_bits, refblock_bits, generous):
    """qcow2_refcount_metadata_size's fixed point: refcount blocks covering ``clusters`` and themselves and their
    table (``generous``: room for half the table again)."""
    per_table_cluster = (np.int64(1) << cluster_bits) // REFTABLE_ENTRY_BYTES
    per_block = np.int64(1) << refblock_bits
    table = 0
    blocks = 0
    n = 0
    while True:
        last = n
        blocks = (clusters + table + blocks + per_block - 1) // per_block
        table = (blocks + per_table_cluster - 1) // per_table_cluster
        n = clusters + blocks + table
        if n == last and generous:
            clusters += (table + 1) // 2
            n = 0
            generous = False
        if n == last:
            return blocks


@njit(cache=True)
def _refcount_area(used, covered, alloc, rlog, rst, start):
    """qcow2_refcount_area(start, 0 additional clusters, not exact): refcount blocks for every range from ``start``'s
    up to what the new structures need, then the new table right after them, all with refcount 1; the old table is
    freed."""
    cluster_bits = alloc[CLUSTER_BITS]
    total = refcount_metadata_blocks(start, cluster_bits, alloc[REFBLOCK_BITS], True)
    per_table_cluster = (np.int64(1) << cluster_bits) // REFTABLE_ENTRY_BYTES
    table_size = total + (total + 1) // 2
    table_size = (table_size + per_table_cluster - 1) // per_table_cluster * per_table_cluster
    table_clusters = table_size // per_table_cluster
    area_index = start >> alloc[REFBLOCK_BITS]
    if total > covered.shape[0]:
        alloc[OVERFLOW] = 1
        return
    new_blocks = 0
    for i in range(area_index, total):
        if covered[i] == 0:
            new_blocks += 1
    end = start + new_blocks + table_clusters
    per_block = np.int64(1) << alloc[REFBLOCK_BITS]
    for i in range(area_index, total):  # each block: reused (a lookup) or new (get_empty); dirtied if it covers
        if covered[i] == 0:
            covered[i] = 1
            log(rlog, rst, i, R_GET_EMPTY, 1)
        else:
            log(rlog, rst, i, R_GET_DIRTY if i * per_block < end else R_GET, 1)
    log(rlog, rst, 0, R_FLUSH, 1)
    _set_range(used, alloc, start, end, 1)
    old, old_clusters = alloc[REFTABLE_CLUSTER], alloc[REFTABLE_ENTRIES] // per_table_cluster
    alloc[REFTABLE_CLUSTER] = start + new_blocks
    alloc[REFTABLE_ENTRIES] = table_size
    alloc[REFTABLE_GROWN] += 1
    log(rlog, rst, 0, R_RC_DEPENDS, 1)  # qcow2_free_clusters of the old table (its refcount block exists)
    last_block = -1
    for c in range(old, old + old_clusters):
        if c >> alloc[REFBLOCK_BITS] != last_block:
            last_block = c >> alloc[REFBLOCK_BITS]
            log(rlog, rst, last_block, R_GET_DIRTY, 1)
        _set_used(used, alloc, c, 0)
    alloc[FREE_INDEX] = min(alloc[FREE_INDEX], old)


@njit(cache=True)
def update_refcount(used, covered, alloc, rlog, rst, first, n, addend):
    """Set (addend 1) or clear (addend -1) clusters [first, first+n); -EAGAIN after creating a refcount block, with
    the clusters already updated reverted, as QEMU's error path does. One dirtying lookup per run of clusters in
    one block; a decrease first makes the refcount cache depend on the L2 cache."""
    if n <= 0:
        return 0
    if addend < 0:
        log(rlog, rst, 0, R_RC_DEPENDS, 1)
    bits = alloc[REFBLOCK_BITS]
    cluster = first
    while cluster < first + n:
        block_index = cluster >> bits
        if block_index >= covered.shape[0]:
            alloc[OVERFLOW] = 1
            return 0
        if covered[block_index] == 0:
            ret = _alloc_refcount_block(used, covered, alloc, rlog, rst, cluster)
            if alloc[FREE_INDEX] > first:  # "try the same ones first to see if they're still free"
                alloc[FREE_INDEX] = first
            if cluster > first:  # the undo: update_refcount of the clusters done, the other way
                if addend > 0:  # undoing an increase is a decrease
                    log(rlog, rst, 0, R_RC_DEPENDS, 1)
                for undo_block in range(first >> bits, ((cluster - 1) >> bits) + 1):
                    log(rlog, rst, undo_block, R_GET_DIRTY, 1)
                _set_range(used, alloc, first, cluster, 0 if addend > 0 else 1)  # revert
                if addend > 0:
                    alloc[FREE_INDEX] = min(alloc[FREE_INDEX], first)
            return ret
        log(rlog, rst, block_index, R_GET_DIRTY, 1)
        run_end = min(first + n, (block_index + 1) << bits)
        _set_range(used, alloc, cluster, run_end, 1 if addend > 0 else 0)
        if addend < 0:
            alloc[FREE_INDEX] = min(alloc[FREE_INDEX], cluster)
        cluster = run_end
    return 0


@njit(cache=True)
def alloc_clusters(used, covered, alloc, rlog, rst, n):
    """qcow2_alloc_clusters: first host cluster of n newly allocated, contiguous clusters."""
    while True:
        first = alloc_clusters_noref(used, covered, alloc, rlog, rst, n)
        if update_refcount(used, covered, alloc, rlog, rst, first, n, 1) != EAGAIN:
            return first


@njit(cache=True)
def alloc_clusters_at(used, covered, alloc, rlog, rst, first, n):
    """qcow2_alloc_clusters_at: allocate up to n clusters exactly at ``first``; how many it got (0 if taken). One
    qcow2_get_refcount per cluster checked, the used one that stops the run included."""
    if n == 0:
        return 0
    while True:
        free = 0
        while free < n and not _is_used(used, first + free):
            free += 1
        log_lookups(covered, alloc, rlog, rst, first, first + free + (1 if free < n else 0))
        if update_refcount(used, covered, alloc, rlog, rst, first, free, 1) != EAGAIN:
            return free


@njit(cache=True)
def free_cluster(used, covered, alloc, rlog, rst, cluster):
    update_refcount(used, covered, alloc, rlog, rst, cluster, 1, -1)
