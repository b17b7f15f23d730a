"""Stage 2 of the replay: an L2 cache event stream -> hits, misses, evictions and write-backs for many cache sizes.

QEMU's qcow2 cache is one fully associative LRU (block/qcow2-cache.c), so Mattson's stack algorithm applies: one
pass computes every access's reuse (stack) distance -- the number of distinct slices touched since the previous
access of the same slice, plus one -- and an access hits in a cache of C entries exactly when its distance is at
most C. Misses for every size then come from one histogram. Evictions follow (a cache never shrinks, so every miss
after the first C evicts). Write-backs depend on dirtiness and flushes, so they get one short compiled pass per size.
For a handful of sizes, simulating each cache directly (O(1) per access) is faster still.

All kernels carry their state in arrays, so a trace can be fed in chunks (``CacheModel.feed``) with results equal
to one whole pass: that is how traces larger than memory stream. The sequential kernels are ``_distances_step``
(a Fenwick tree over access times, compacted whenever it fills, so it stays about four times the number of distinct
slices and in cache), ``_writebacks_step`` and ``_simulate_step``; the tests hold plain-Python references beside
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .events import GET_DIRTY, GET_EMPTY

COLD = np.iinfo(np.int64).max  # distance of a first access: a miss in every cache
DIRECT_SIMULATION_MAX_SIZES = 3
# scalar state of the distance kernel
D_MARKS, D_TIME, D_EVENTS, D_LAST_KEY = range(4)
# scalar state of a direct simulation
S_HEAD, S_TAIL, S_SIZE, S_HITS, S_READS, S_WRITTEN, S_FLUSHES = range(7)


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
def _distances_step(keys, kinds, tree, key_at, mark_of_key, last_access, scalars, dist, hist, read_hist):
    """Stack distances of ``keys`` (written to ``dist``; counted into ``hist`` and, for accesses that read the disk
    on a miss, ``read_hist``, clipped at n_keys + 1 = cold), continuing from the state left by earlier chunks.
    ``last_access`` holds global event indices; ``scalars``: live marks, last tree position, events so far."""
    size = tree.shape[0]
    marks = scalars[D_MARKS]
    t = scalars[D_TIME]
    base = scalars[D_EVENTS]
    last_key = scalars[D_LAST_KEY]
    n_keys = mark_of_key.shape[0]
    keep = dist.shape[0] > 0  # distances are kept only when write-backs need them
    for i in range(keys.shape[0]):
        k = keys[i]
        if k == last_key:  # the same slice again: distance 1, and its mark is already the newest
            if keep:
                dist[i] = 1
            last_access[k] = base + i
            hist[1] += 1
            if kinds[i] != GET_EMPTY:
                read_hist[1] += 1
            continue
        last_key = k
        if t + 1 >= size:  # compact: renumber live marks 1..marks keeping their order, rebuild the tree
            pos = 0
            for old in range(1, t + 1):
                key = key_at[old]
                if key < n_keys and mark_of_key[key] == old:
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
            if keep:
                dist[i] = COLD
            marks += 1
            bucket = n_keys + 1
        else:
            d = marks - _fenwick_prefix(tree, p) + 1
            if keep:
                dist[i] = d
            bucket = min(d, n_keys + 1)
            _fenwick_add(tree, p, -1)
        hist[bucket] += 1
        if kinds[i] != GET_EMPTY:
            read_hist[bucket] += 1
        t += 1
        _fenwick_add(tree, t, 1)
        mark_of_key[k] = t
        key_at[t] = k
        last_access[k] = base + i
    scalars[D_MARKS] = marks
    scalars[D_TIME] = t
    scalars[D_EVENTS] = base + keys.shape[0]
    scalars[D_LAST_KEY] = last_key


def stack_distances(keys: np.ndarray, n_keys: int, tree_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack distance of every access (COLD for first accesses) and each key's last access, in one pass.
    ``tree_size`` (tests only) forces a small tree so compaction runs often."""
    state = _DistanceState(n_keys, tree_size)
    return state.step(keys, np.zeros(len(keys), np.uint8)), state.last_access


class _DistanceState:
    def __init__(self, n_keys: int, tree_size: int = 0):
        # About four times the distinct keys: small enough to stay in cache, large enough that compaction is rare.
        size = tree_size if tree_size > n_keys + 1 else max(4 * n_keys, 1 << 16) + 1
        self.tree = np.zeros(size, dtype=np.int32)
        self.key_at = np.full(size, n_keys, dtype=np.int64)
        self.mark_of_key = np.zeros(n_keys, dtype=np.int64)
        self.last_access = np.full(n_keys, -1, dtype=np.int64)
        self.scalars = np.array([0, 0, 0, -1], dtype=np.int64)
        self.hist = np.zeros(n_keys + 2, np.int64)  # accesses by distance, clipped: n_keys + 1 = cold
        self.read_hist = np.zeros(n_keys + 2, np.int64)  # the same for accesses that read the disk on a miss

    def step(self, keys: np.ndarray, kinds: np.ndarray, keep: bool = True) -> np.ndarray:
        dist = np.empty(len(keys) if keep else 0, dtype=np.int64)
        _distances_step(keys, kinds, self.tree, self.key_at, self.mark_of_key, self.last_access, self.scalars, dist,
                        self.hist, self.read_hist)
        return dist


@njit(cache=True)
def _writebacks_step(keys, kinds, dist, flush_count, entries, dirty, last_flushes, seen, written):
    """Dirty entries written back in a cache of ``entries`` entries, continuing earlier chunks' state.

    ``flush_count[i]``: whole-cache flushes before access i (counted from the start of the trace). An entry is
    cleaned between two accesses if a flush falls between them or it was evicted (distance > entries); GET_DIRTY
    and GET_EMPTY accesses dirty it."""
    for i in range(keys.shape[0]):
        k = keys[i]
        if seen[k]:
            if dirty[k] and (dist[i] > entries or flush_count[i] > last_flushes[k]):
                written[0] += 1
                dirty[k] = 0
            elif dist[i] > entries:
                dirty[k] = 0
        seen[k] = 1
        last_flushes[k] = flush_count[i]
        if kinds[i] == GET_DIRTY or kinds[i] == GET_EMPTY:
            dirty[k] = 1


@njit(cache=True)
def _writebacks_finish(entries, dirty, last_flushes, seen, forward_distinct, total_flushes):
    """(write-backs after each key's last access, entries still dirty at the end of the trace)."""
    written = 0
    left = 0
    for k in range(dirty.shape[0]):
        if seen[k] and dirty[k]:
            if forward_distinct[k] >= entries or total_flushes > last_flushes[k]:
                written += 1
            else:
                left += 1
    return written, left


@njit(cache=True)
def _flush_all(nxt, dirty, head):
    written = 0
    k = head
    while k >= 0:
        if dirty[k]:
            written += 1
            dirty[k] = 0
        k = nxt[k]
    return written


@njit(cache=True)
def _simulate_step(keys, kinds, flush_count, entries, prev, nxt, resident, dirty, s):
    """One LRU cache of ``entries`` entries, simulated directly (keys are dense ints: the LRU list is two arrays),
    continuing from state ``s`` (head, tail, size, hits, disk reads, write-backs, flushes seen)."""
    head, tail, size = s[S_HEAD], s[S_TAIL], s[S_SIZE]
    for i in range(keys.shape[0]):
        if flush_count[i] > s[S_FLUSHES]:  # a whole-cache flush writes every dirty resident entry
            s[S_FLUSHES] = flush_count[i]
            s[S_WRITTEN] += _flush_all(nxt, dirty, head)
        k = keys[i]
        if resident[k]:
            s[S_HITS] += 1
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
                s[S_READS] += 1
            if size >= entries:  # evict the least recently used
                victim = tail
                tail = prev[victim]
                if tail >= 0:
                    nxt[tail] = -1
                else:
                    head = -1
                resident[victim] = 0
                if dirty[victim]:
                    s[S_WRITTEN] += 1
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
    s[S_HEAD], s[S_TAIL], s[S_SIZE] = head, tail, size


def simulate(keys, kinds, flush_count, n_keys, entries):
    """A whole stream through one cache: (hits, disk reads, write-backs during the trace, dirty left at the end)."""
    model = CacheModel(n_keys, [entries], direct=True)
    model.feed(keys, kinds, np.zeros(0, np.int64), flush_count)
    c = model.finish()[0]
    return c.hits, c.disk_reads, c.writebacks, c.writebacks_at_close


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


class CacheModel:
    """Caches of several sizes (entry counts) fed one event stream, in one or many chunks.

    ``direct`` simulates each size (best for a few sizes); otherwise one stack-distance pass serves all sizes and
    write-backs get a pass per size only once dirty entries exist."""

    def __init__(self, n_keys: int, entries: list[int], direct: bool | None = None):
        self.n_keys = max(n_keys, 1)
        self.entries = list(entries)
        self.direct = len(set(entries)) <= DIRECT_SIMULATION_MAX_SIZES if direct is None else direct
        self.lookups = 0
        self.flushes = 0
        if self.direct:
            self.sims = [(np.full(self.n_keys, -1, np.int64), np.full(self.n_keys, -1, np.int64),
                          np.zeros(self.n_keys, np.uint8), np.zeros(self.n_keys, np.uint8),
                          np.array([-1, -1, 0, 0, 0, 0, 0], np.int64)) for _ in self.entries]
        else:
            self.distances = _DistanceState(self.n_keys)
            self.dirty_state = None  # per size: dirty, last_flushes, seen, written -- created at the first dirt

    def feed(self, key: np.ndarray, kind: np.ndarray, flush_at: np.ndarray, flush_count: np.ndarray | None = None):
        """Add a chunk of events; ``flush_at`` are this chunk's flush positions (a flush before event j)."""
        if flush_count is None:
            flush_count = self.flushes + np.searchsorted(flush_at, np.arange(len(key) + 1), side="right")
        self.lookups += len(key)
        if self.direct:
            for e, (prev, nxt, resident, dirty, s) in zip(self.entries, self.sims):
                _simulate_step(key, kind, flush_count, e, prev, nxt, resident, dirty, s)
        else:
            dirt = self.dirty_state is not None or bool(((kind == GET_DIRTY) | (kind == GET_EMPTY)).any())
            dist = self.distances.step(key, kind, keep=dirt)
            if self.dirty_state is None and ((kind == GET_DIRTY) | (kind == GET_EMPTY)).any():
                # Nothing was dirty before this chunk, so no earlier access owes a write-back: start from zeros.
                self.dirty_state = [(np.zeros(self.n_keys, np.uint8), np.zeros(self.n_keys, np.int64),
                                     np.zeros(self.n_keys, np.uint8), np.zeros(1, np.int64)) for _ in self.entries]
            if self.dirty_state is not None:
                for e, (dirty, last_flushes, seen, written) in zip(self.entries, self.dirty_state):
                    _writebacks_step(key, kind, dist, flush_count, e, dirty, last_flushes, seen, written)
        self.flushes = int(flush_count[-1])

    def finish(self) -> list[CacheCounts]:
        out = []
        if self.direct:
            for e, (_, nxt, _, dirty, s) in zip(self.entries, self.sims):
                written = int(s[S_WRITTEN])
                if self.flushes > s[S_FLUSHES]:
                    written += _flush_all(nxt, dirty, s[S_HEAD])
                hits = int(s[S_HITS])
                misses = self.lookups - hits
                out.append(CacheCounts(e, self.lookups, hits, misses, int(s[S_READS]), max(misses - e, 0), written,
                                       int(dirty.sum())))
            return out
        last = self.distances.last_access
        seen = last >= 0
        order = np.argsort(last[seen])
        rank = np.empty(int(seen.sum()), np.int64)
        rank[order] = np.arange(len(rank))
        forward = np.full(self.n_keys, -1, np.int64)
        forward[seen] = len(rank) - 1 - rank
        hist, read_hist = self.distances.hist, self.distances.read_hist
        for k, e in enumerate(self.entries):
            hits = int(hist[1: min(e, self.n_keys) + 1].sum())
            reads_hit = int(read_hist[1: min(e, self.n_keys) + 1].sum())
            misses = self.lookups - hits
            written = left = 0
            if self.dirty_state is not None:
                dirty, last_flushes, seen_k, w = self.dirty_state[k]
                tail, left = _writebacks_finish(e, dirty, last_flushes, seen_k, forward, self.flushes)
                written = int(w[0]) + int(tail)
            out.append(CacheCounts(e, self.lookups, hits, misses, int(read_hist.sum()) - reads_hit,
                                   max(misses - e, 0), written, int(left)))
        return out


def counts_for_sizes(key: np.ndarray, kind: np.ndarray, flush_at: np.ndarray, n_keys: int,
                     entries: list[int], direct: bool | None = None) -> list[CacheCounts]:
    """Counters for each cache size from one whole event stream."""
    model = CacheModel(n_keys, entries, direct)
    model.feed(key, kind, flush_at)
    return model.finish()
