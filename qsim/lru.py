"""Stage 2 of the replay: an L2 cache event stream -> hits, misses, evictions and write-backs for many cache sizes.

QEMU's qcow2 cache is one fully associative LRU (block/qcow2-cache.c), so Mattson's stack algorithm applies: one
pass computes every access's reuse (stack) distance -- the number of distinct slices touched since the previous
access of the same slice, plus one -- and an access hits in a cache of C entries exactly when its distance is at
most C. Misses for every size then come from one histogram. Evictions follow (a cache never shrinks, so every miss
after the first C evicts). Write-backs depend on dirtiness and flushes, so they get one short compiled pass per size.

The two passes are the sequential kernels here: ``stack_distances`` (a Fenwick tree over access times, compacted
whenever it fills, so it stays about twice the number of distinct slices and in cache) and ``writebacks``. The
tests hold plain-Python reference implementations beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .events import GET_DIRTY, GET_EMPTY

COLD = np.iinfo(np.int64).max  # distance of a first access: a miss in every cache


@njit(cache=True)
def _fenwick_add(tree, i, delta):
    n = tree.shape[0]
    while i < n:
        tree[i] += delta
        i += i & -i


@njit(cache=True)
def _fenwick_prefix(tree, i):
    total = 0
    while i > 0:
        total += tree[i]
        i -= i & -i
    return total


@njit(cache=True)
def stack_distances(keys, n_keys, tree_size=0):
    """LRU stack distance of every access (COLD for first accesses), and the index of each key's last access.

    ``tree_size`` (tests only) forces a small tree so compaction runs often."""
    n = keys.shape[0]
    # About four times the distinct keys: small enough to stay in cache, large enough that compaction is rare.
    size = tree_size if tree_size > n_keys + 1 else max(4 * n_keys, 1 << 16) + 1
    tree = np.zeros(size, dtype=np.int32)
    key_at = np.zeros(size, dtype=np.int64)  # which key a tree position was stamped for
    mark_of_key = np.zeros(n_keys, dtype=np.int64)  # position of the key's live mark (0: never seen)
    last_access = np.full(n_keys, -1, dtype=np.int64)
    dist = np.empty(n, dtype=np.int64)
    marks = 0  # live marks = distinct keys seen so far
    t = 0  # last position stamped
    for i in range(n):
        k = keys[i]
        if t + 1 >= size:  # compact: renumber live marks 1..marks keeping their order, rebuild the tree
            pos = 0
            for old in range(1, t + 1):
                key = key_at[old]
                if mark_of_key[key] == old:
                    pos += 1
                    mark_of_key[key] = pos
                    key_at[pos] = key
            tree[:] = 0
            tree[1: pos + 1] = 1
            for j in range(1, size):  # linear Fenwick build
                parent = j + (j & -j)
                if parent < size:
                    tree[parent] += tree[j]
            t = pos
        p = mark_of_key[k]
        if p == 0:
            dist[i] = COLD
            marks += 1
        else:
            dist[i] = marks - _fenwick_prefix(tree, p) + 1
            _fenwick_add(tree, p, -1)
        t += 1
        _fenwick_add(tree, t, 1)
        mark_of_key[k] = t
        key_at[t] = k
        last_access[k] = i
    return dist, last_access


@njit(cache=True)
def writebacks(keys, kinds, dist, flush_count, n_keys, entries, evicted_after_last):
    """Dirty entries written back, for a cache of ``entries`` entries: (during the trace, still dirty at the end).

    ``flush_count[i]``: whole-cache flushes before access i. An entry is cleaned between two accesses if a flush
    falls between them or it was evicted (distance > entries); dirtied by GET_DIRTY and GET_EMPTY accesses.
    ``evicted_after_last[k]``: the key is evicted after its last access (forward distinct count >= entries).
    """
    dirty = np.zeros(n_keys, dtype=np.uint8)
    last_flushes = np.zeros(n_keys, dtype=np.int64)
    seen = np.zeros(n_keys, dtype=np.uint8)
    written = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        if seen[k]:
            if dirty[k] and (dist[i] > entries or flush_count[i] > last_flushes[k]):
                written += 1
                dirty[k] = 0
            elif dist[i] > entries:
                dirty[k] = 0
        seen[k] = 1
        last_flushes[k] = flush_count[i]
        if kinds[i] == GET_DIRTY or kinds[i] == GET_EMPTY:
            dirty[k] = 1
    total_flushes = flush_count[keys.shape[0]] if keys.shape[0] < flush_count.shape[0] else 0
    left_dirty = 0
    for k in range(n_keys):
        if seen[k] and dirty[k]:
            if evicted_after_last[k] or total_flushes > last_flushes[k]:
                written += 1
            else:
                left_dirty += 1
    return written, left_dirty


@njit(cache=True)
def simulate(keys, kinds, flush_count, n_keys, entries):
    """One LRU cache of ``entries`` entries, simulated directly (keys are dense ints: the LRU list is two arrays).
    Returns (hits, disk reads, write-backs during the trace, dirty entries left at the end). O(1) per access: the
    fastest way for a handful of sizes; stack distances win for many."""
    prev = np.full(n_keys, -1, dtype=np.int64)
    nxt = np.full(n_keys, -1, dtype=np.int64)
    resident = np.zeros(n_keys, dtype=np.uint8)
    dirty = np.zeros(n_keys, dtype=np.uint8)
    head = -1  # most recently used
    tail = -1  # least recently used
    size = 0
    hits = 0
    reads = 0
    written = 0
    flushes_seen = 0
    for i in range(keys.shape[0]):
        if flush_count[i] > flushes_seen:  # a whole-cache flush writes every dirty resident entry
            flushes_seen = flush_count[i]
            k = head
            while k >= 0:
                if dirty[k]:
                    written += 1
                    dirty[k] = 0
                k = nxt[k]
        k = keys[i]
        if resident[k]:
            hits += 1
            if k != head:  # unlink, then push to the front
                p = prev[k]
                q = nxt[k]
                nxt[p] = q
                if q >= 0:
                    prev[q] = p
                else:
                    tail = p
                prev[k] = -1
                nxt[k] = head
                prev[head] = k
                head = k
        else:
            if kinds[i] != GET_EMPTY:
                reads += 1
            if size >= entries:  # evict the tail
                victim = tail
                tail = prev[victim]
                if tail >= 0:
                    nxt[tail] = -1
                else:
                    head = -1
                resident[victim] = 0
                if dirty[victim]:
                    written += 1
                    dirty[victim] = 0
                size -= 1
            resident[k] = 1
            size += 1
            prev[k] = -1
            nxt[k] = head
            if head >= 0:
                prev[head] = k
            head = k
            if tail < 0:
                tail = k
        if kinds[i] == GET_DIRTY or kinds[i] == GET_EMPTY:
            dirty[k] = 1
    if flush_count[keys.shape[0]] > flushes_seen:
        k = head
        while k >= 0:
            if dirty[k]:
                written += 1
                dirty[k] = 0
            k = nxt[k]
    left = 0
    for k in range(n_keys):
        left += dirty[k]
    return hits, reads, written, left


@dataclass(frozen=True, eq=False)
class Distances:
    """Everything stage 2 needs from one event stream, computed once for all cache sizes."""

    dist: np.ndarray
    miss_hist: np.ndarray  # accesses by distance, clipped: index n_keys+1 = cold
    read_hist: np.ndarray  # the same for accesses that read the disk on a miss (not get_empty)
    forward_distinct: np.ndarray  # per key: distinct keys accessed after its last access (-1: never accessed)
    flush_count: np.ndarray  # per access (and one past the end): flushes before it
    has_dirty: bool


def analyse(key: np.ndarray, kind: np.ndarray, flush_at: np.ndarray, n_keys: int) -> Distances:
    dist, last_access = stack_distances(key, n_keys)
    cap = n_keys + 1
    clipped = np.minimum(dist, cap)
    miss_hist = np.bincount(clipped, minlength=cap + 1)
    read_hist = np.bincount(clipped[kind != GET_EMPTY], minlength=cap + 1)
    forward = np.full(n_keys, -1, dtype=np.int64)
    seen = last_access >= 0
    lasts = last_access[seen]
    order = np.argsort(lasts)
    rank = np.empty(len(lasts), dtype=np.int64)
    rank[order] = np.arange(len(lasts))
    forward[seen] = len(lasts) - 1 - rank
    flush_count = np.searchsorted(flush_at, np.arange(len(key) + 1), side="right")
    has_dirty = bool(((kind == GET_DIRTY) | (kind == GET_EMPTY)).any())
    return Distances(dist, miss_hist, read_hist, forward, flush_count, has_dirty)


@dataclass(frozen=True)
class CacheCounts:
    entries: int
    lookups: int
    hits: int
    misses: int
    disk_reads: int
    evictions: int
    writebacks: int
    writebacks_at_close: int


def counts_for(d: Distances, key: np.ndarray, kind: np.ndarray, n_keys: int, entries: int) -> CacheCounts:
    """Counters of a cache of ``entries`` entries (at least 1)."""
    lookups = int(d.miss_hist.sum())
    hits = int(d.miss_hist[1: min(entries, n_keys) + 1].sum())
    reads_hit = int(d.read_hist[1: min(entries, n_keys) + 1].sum())
    misses = lookups - hits
    disk_reads = int(d.read_hist.sum()) - reads_hit
    if d.has_dirty:
        evicted_after = (d.forward_distinct >= entries).astype(np.uint8)
        written, left = writebacks(key, kind, d.dist, d.flush_count, n_keys, entries, evicted_after)
    else:
        written, left = 0, 0
    return CacheCounts(entries, lookups, hits, misses, disk_reads, max(misses - entries, 0), int(written), int(left))


DIRECT_SIMULATION_MAX_SIZES = 3


def counts_for_sizes(key: np.ndarray, kind: np.ndarray, flush_at: np.ndarray, n_keys: int,
                     entries: list[int]) -> list[CacheCounts]:
    """Counters for each cache size: direct simulation for a few sizes, one stack-distance pass for many."""
    lookups = len(key)
    if len(set(entries)) <= DIRECT_SIMULATION_MAX_SIZES:
        flush_count = np.searchsorted(flush_at, np.arange(len(key) + 1), side="right")
        out = []
        for e in entries:
            hits, reads, written, left = simulate(key, kind, flush_count, n_keys, e)
            misses = lookups - hits
            out.append(CacheCounts(e, lookups, int(hits), misses, int(reads), max(misses - e, 0), int(written),
                                   int(left)))
        return out
    d = analyse(key, kind, flush_at, n_keys)
    return [counts_for(d, key, kind, n_keys, e) for e in entries]
