"""The allocator's two hot loops against their reference implementations: QEMU's candidate-by-candidate first-fit
search (alloc_clusters_noref) and its cluster-by-cluster update_refcount, written as plain Python beside the
compiled run-at-a-time versions in qsim.hostalloc. Same result, same state, same refcount-cache log, on random
maps with holes and refcount blocks missing."""

from __future__ import annotations

import numpy as np
import pytest

from qsim import hostalloc
from qsim.hostalloc import EAGAIN, FREE_INDEX, OVERFLOW, REFBLOCK_BITS
from qsim.codes import R_GET_DIRTY, R_RC_DEPENDS


def reference_alloc_clusters_noref(used, covered, alloc, rlog, rst, n):
    """alloc_clusters_noref as QEMU writes it: free_cluster_index++ per candidate, a retry after a used one."""
    while True:
        restart = False
        start = alloc[FREE_INDEX]
        for _ in range(n):
            index = alloc[FREE_INDEX]
            alloc[FREE_INDEX] += 1
            if hostalloc._is_used(used, index):
                restart = True
                break
        hostalloc.log_lookups(covered, alloc, rlog, rst, start, alloc[FREE_INDEX])
        if not restart:
            return alloc[FREE_INDEX] - n


def reference_update_refcount(used, covered, alloc, rlog, rst, first, n, addend):
    """update_refcount cluster by cluster, with the undo of the clusters done when a refcount block is made."""
    if n <= 0:
        return 0
    if addend < 0:
        hostalloc.log(rlog, rst, 0, R_RC_DEPENDS, 1)
    last_block = -1
    for cluster in range(first, first + n):
        block_index = cluster >> alloc[REFBLOCK_BITS]
        if block_index >= covered.shape[0]:
            alloc[OVERFLOW] = 1
            return 0
        if covered[block_index] == 0:
            ret = hostalloc._alloc_refcount_block(used, covered, alloc, rlog, rst, cluster)
            if alloc[FREE_INDEX] > first:
                alloc[FREE_INDEX] = first
            if cluster > first:
                if addend > 0:
                    hostalloc.log(rlog, rst, 0, R_RC_DEPENDS, 1)
                undo_block = -1
                for done in range(first, cluster):
                    if done >> alloc[REFBLOCK_BITS] != undo_block:
                        undo_block = done >> alloc[REFBLOCK_BITS]
                        hostalloc.log(rlog, rst, undo_block, R_GET_DIRTY, 1)
            for done in range(first, cluster):
                hostalloc._set_used(used, alloc, done, 0 if addend > 0 else 1)
                if addend > 0 and done < alloc[FREE_INDEX]:
                    alloc[FREE_INDEX] = done
            return ret
        if block_index != last_block:
            last_block = block_index
            hostalloc.log(rlog, rst, block_index, R_GET_DIRTY, 1)
        hostalloc._set_used(used, alloc, cluster, 1 if addend > 0 else 0)
        if addend < 0 and cluster < alloc[FREE_INDEX]:
            alloc[FREE_INDEX] = cluster
    return 0


def random_state(seed, clusters=600):
    """A 512-byte-cluster allocator (64 refcounts per block) with random used runs, some blocks not yet made, a
    free_cluster_index somewhere, and room in the log."""
    rng = np.random.default_rng(seed)
    used = np.zeros(clusters, np.uint8)
    for start in rng.integers(0, clusters, 40):
        used[start:start + rng.integers(1, 30)] = 1
    covered = np.zeros(clusters // 64 + 4, np.uint8)
    covered[: clusters // 64 + 1] = rng.random(clusters // 64 + 1) < 0.8
    covered[0] = 1
    alloc = hostalloc.new_alloc_state(512, 64)
    alloc[hostalloc.HIGH_WATER] = int(np.flatnonzero(used)[-1]) + 1
    alloc[FREE_INDEX] = int(rng.integers(0, clusters // 2))
    rlog, rst = np.zeros((4096, hostalloc.RLOG_WIDTH), np.int64), np.zeros(hostalloc.RST_SIZE, np.int64)
    rst[hostalloc.RS_AT] = 7
    return rng, used, covered, alloc, rlog, rst


def copies(state):
    return tuple(a.copy() for a in state)


def assert_same(got, want):
    for a, b, name in zip(got, want, ("used", "covered", "alloc", "rlog", "rst")):
        if name == "rlog":
            a, b = a[: got[4][hostalloc.RS_COUNT]], b[: want[4][hostalloc.RS_COUNT]]
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("seed", range(30))
def test_first_fit_search_equals_the_candidate_loop(seed):
    rng, *state = random_state(seed)
    for n in (1, int(rng.integers(2, 12)), int(rng.integers(20, 90))):
        mine, ref = copies(state), copies(state)
        got = hostalloc.alloc_clusters_noref(*mine, n)
        want = reference_alloc_clusters_noref(*ref, n)
        assert got == want
        assert not mine[0][got:got + n].any()
        assert_same(mine, ref)


@pytest.mark.parametrize("seed", range(30))
def test_update_refcount_equals_the_cluster_loop(seed):
    rng, *state = random_state(seed)
    outcomes = set()
    for _ in range(6):
        first, n = int(rng.integers(0, 560)), int(rng.integers(1, 150))
        addend = int(rng.choice([1, -1]))
        mine, ref = copies(state), copies(state)
        got = hostalloc.update_refcount(*mine, first, n, addend)
        want = reference_update_refcount(*ref, first, n, addend)
        assert got == want
        assert_same(mine, ref)
        outcomes.add(got)
        state = mine  # carry on from here: later calls see the blocks made
    assert outcomes <= {0, EAGAIN}
