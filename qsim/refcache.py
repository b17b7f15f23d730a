"""Stage 2 for the refcount-block cache: the refcount log and the L2 event stream through both caches together.

The two caches depend on each other (block/qcow2-cache.c qcow2_cache_set_dependency): after an L2 link the L2 cache
depends on the refcount cache, so the next write-back of a dirty L2 slice (an eviction or a flush) first flushes
the whole refcount cache; after a refcount decrease the refcount cache depends on the L2 cache the same way. Which
L2 write-backs happen depends on the L2 cache's size, so refcount write-backs need one coupled simulation per (L2
entries, refcount entries) pair: ``_coupled_step`` simulates both LRUs directly (O(1) per access), merging the log
into the L2 stream by its stamps (a row comes after the L2 events before its RL_AT), and does every flush QEMU does.

Stage 1 already put the L2 flushes it knows into the L2 stream, the dependency flushes included (R_L2_DEP_FLUSH:
made because a refcount dropped). Where QEMU's L2 flushes differ from those -- a dirty refcount block evicted while
the refcount cache depends on the L2 cache flushes the L2 cache, or a dependency stage 1 assumed was already gone --
the coupled run counts a ``divergence``: its own L2 counters are then QEMU's, and the one-pass L2 counters are not.

Rows of the log with a repeat count are that many lookups of one block (the first may miss, the rest hit). QEMU's
cache cleaning applies to both caches (``clean``). A plain-Python reference sits beside the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .codes import (GET_EMPTY, GET_DIRTY, R_FLUSH, R_GET, R_GET_DIRTY, R_GET_EMPTY, R_L2_DEP_FLUSH, R_L2_DEPENDS,
                    R_L2_FLUSH, R_RC_DEPENDS)
from .hostalloc import RL_AT, RL_KEY, RL_KIND, RL_REPEAT
from .lru import (S_CLEANED, S_EVICTED, S_HEAD, S_HITS, S_READS, S_SIZE, S_TAIL, S_WRITTEN, SIM_STATE_SIZE,
                  _clean_step)

# per-cache scalars: a direct simulation's (qsim.lru), so lru's kernels work on these caches too, then two more
HEAD, TAIL, SIZE, HITS, READS, WRITTEN, EVICTED, CLEANED = (S_HEAD, S_TAIL, S_SIZE, S_HITS, S_READS, S_WRITTEN,
                                                           S_EVICTED, S_CLEANED)
LOOKUPS, COUNTER = SIM_STATE_SIZE, SIM_STATE_SIZE + 1
CACHE_SCALARS = SIM_STATE_SIZE + 2
# shared flags and counters
L2_DEPENDS, RC_DEPENDS, DIVERGENCE, INDUCED_L2_FLUSHES = range(4)
FLAGS_SIZE = 4


def new_cache(n_keys: int) -> tuple:
    """(prev, nxt, resident, dirty, stamp, scalars) of an empty direct-simulated LRU cache over keys 0..n_keys-1."""
    s = np.zeros(CACHE_SCALARS, np.int64)
    s[HEAD] = s[TAIL] = -1
    return (np.full(n_keys, -1, np.int64), np.full(n_keys, -1, np.int64), np.zeros(n_keys, np.uint8),
            np.zeros(n_keys, np.uint8), np.zeros(n_keys, np.int64), s)


@njit(cache=True)
def _access(prev, nxt, resident, dirty, stamp, s, capacity, k, reads, repeat):
    """``repeat`` lookups of key k (the first may miss; ``reads``: a miss reads the disk). Returns whether a dirty
    victim was evicted (the caller does the dependency flush, then it is counted written here)."""
    s[LOOKUPS] += repeat
    s[COUNTER] += repeat
    victim_dirty = False
    head = s[HEAD]
    if resident[k]:
        s[HITS] += repeat
        if k != head:
            p = prev[k]
            q = nxt[k]
            nxt[p] = q
            if q >= 0:
                prev[q] = p
            else:
                s[TAIL] = p
            prev[k] = -1
            nxt[k] = head
            prev[head] = k
            s[HEAD] = k
    else:
        s[HITS] += repeat - 1
        if reads:
            s[READS] += 1
        if s[SIZE] >= capacity:
            victim = s[TAIL]
            tail = prev[victim]
            s[TAIL] = tail
            if tail >= 0:
                nxt[tail] = -1
            else:
                s[HEAD] = -1
            resident[victim] = 0
            s[EVICTED] += 1
            if dirty[victim]:
                victim_dirty = True
                s[WRITTEN] += 1
                dirty[victim] = 0
            s[SIZE] -= 1
        head = s[HEAD]
        resident[k] = 1
        s[SIZE] += 1
        prev[k] = -1
        nxt[k] = head
        if head >= 0:
            prev[head] = k
        s[HEAD] = k
        if s[TAIL] < 0:
            s[TAIL] = k
    stamp[k] = s[COUNTER]
    return victim_dirty


@njit(cache=True)
def _dirty_count(nxt, dirty, head):
    n = 0
    k = head
    while k >= 0:
        n += dirty[k]
        k = nxt[k]
    return n


@njit(cache=True)
def _write_all(nxt, dirty, head, s):
    k = head
    while k >= 0:
        if dirty[k]:
            s[WRITTEN] += 1
            dirty[k] = 0
        k = nxt[k]


@njit(cache=True)
def _flush_l2(l2, rc, flags, induced):
    """qcow2_cache_flush of the L2 cache: at its first dirty slice, a dependency on the refcount cache flushes that
    first. ``induced``: QEMU flushes here but stage 1's L2 stream does not (a divergence)."""
    if induced:
        flags[DIVERGENCE] += 1
        flags[INDUCED_L2_FLUSHES] += 1
    if _dirty_count(l2[1], l2[3], l2[5][HEAD]) == 0:
        return
    if flags[L2_DEPENDS]:
        flags[L2_DEPENDS] = 0
        _write_all(rc[1], rc[3], rc[5][HEAD], rc[5])
    _write_all(l2[1], l2[3], l2[5][HEAD], l2[5])


@njit(cache=True)
def _flush_rc(l2, rc, flags):
    """qcow2_cache_flush of the refcount cache: at its first dirty block, a dependency on the L2 cache flushes that
    first (an L2 flush stage 1 did not make)."""
    if _dirty_count(rc[1], rc[3], rc[5][HEAD]) == 0:
        return
    if flags[RC_DEPENDS]:
        flags[RC_DEPENDS] = 0
        _flush_l2(l2, rc, flags, True)
    _write_all(rc[1], rc[3], rc[5][HEAD], rc[5])


@njit(cache=True)
def _l2_events(key, kind, first, last, l2, rc, flags, capacity):
    prev, nxt, resident, dirty, stamp, s = l2
    for i in range(first, last):
        k = key[i]
        o = kind[i]
        if _access(prev, nxt, resident, dirty, stamp, s, capacity, k, o != GET_EMPTY, 1):
            if flags[L2_DEPENDS]:  # the victim's write-back flushes the refcount cache first
                flags[L2_DEPENDS] = 0
                _write_all(rc[1], rc[3], rc[5][HEAD], rc[5])
        if o == GET_DIRTY or o == GET_EMPTY:
            dirty[k] = 1


@njit(cache=True)
def _coupled_step(key, kind, rlog, l2, rc, flags, l2_entries, rc_entries):
    """One chunk: the L2 events ``key``/``kind`` and the refcount log ``rlog`` (stamped with L2 event positions in
    this chunk) through an L2 cache of ``l2_entries`` and a refcount cache of ``rc_entries``."""
    i = 0
    for j in range(rlog.shape[0]):
        row = rlog[j]
        at = row[RL_AT]
        if at > i:
            _l2_events(key, kind, i, at, l2, rc, flags, l2_entries)
            i = at
        o = row[RL_KIND]
        if o == R_GET or o == R_GET_DIRTY or o == R_GET_EMPTY:
            k = row[RL_KEY]
            if _access(rc[0], rc[1], rc[2], rc[3], rc[4], rc[5], rc_entries, k, o != R_GET_EMPTY, row[RL_REPEAT]):
                if flags[RC_DEPENDS]:
                    flags[RC_DEPENDS] = 0
                    _flush_l2(l2, rc, flags, True)
            if o != R_GET:
                rc[3][k] = 1
        elif o == R_FLUSH:
            _flush_rc(l2, rc, flags)
        elif o == R_L2_FLUSH:
            _flush_l2(l2, rc, flags, False)
        elif o == R_L2_DEP_FLUSH:
            if flags[RC_DEPENDS]:
                flags[RC_DEPENDS] = 0
                _flush_l2(l2, rc, flags, False)
            else:  # stage 1 flushed the L2 cache for a dependency QEMU no longer had
                flags[DIVERGENCE] += 1
        elif o == R_L2_DEPENDS:
            if flags[RC_DEPENDS]:
                flags[RC_DEPENDS] = 0
                _flush_l2(l2, rc, flags, True)
            flags[L2_DEPENDS] = 1
        elif o == R_RC_DEPENDS:
            if flags[L2_DEPENDS]:
                flags[L2_DEPENDS] = 0
                _flush_rc(l2, rc, flags)
            flags[RC_DEPENDS] = 1
    if key.shape[0] > i:
        _l2_events(key, kind, i, key.shape[0], l2, rc, flags, l2_entries)


def _grown(cache: tuple, n_keys: int) -> tuple:
    prev, nxt, resident, dirty, stamp, s = cache
    extra = n_keys - len(prev)
    if extra <= 0:
        return cache
    return (np.concatenate([prev, np.full(extra, -1, np.int64)]), np.concatenate([nxt, np.full(extra, -1, np.int64)]),
            np.concatenate([resident, np.zeros(extra, np.uint8)]), np.concatenate([dirty, np.zeros(extra, np.uint8)]),
            np.concatenate([stamp, np.zeros(extra, np.int64)]), s)


@dataclass(frozen=True)
class RefcountCounts:
    """One (L2, refcount) pair's counters: the refcount cache's, and the L2 cache's as the coupled run saw them."""

    lookups: int
    misses: int
    disk_reads: int
    evictions: int
    writebacks: int
    writebacks_at_close: int
    cleaned: int
    divergence: int  # where QEMU's L2 flushes differ from stage 1's L2 stream: use the l2_* below, not one-pass
    l2_misses: int
    l2_disk_reads: int
    l2_evictions: int
    l2_writebacks: int
    l2_writebacks_at_close: int


class CoupledCaches:
    """Both caches of one (L2 entries, refcount entries) pair, fed L2 event chunks and refcount-log chunks."""

    def __init__(self, l2_entries: int, rc_entries: int, l2_keys: int, rc_keys: int = 64,
                 seed_keys: np.ndarray | None = None):
        """``seed_keys``: the L2 cache's clean contents (most recent first) when the pair starts after L2 events
        were already fed elsewhere (a read-only beginning: nothing was dirty)."""
        self.l2_entries, self.rc_entries = max(l2_entries, 1), max(rc_entries, 1)
        self.l2 = new_cache(max(l2_keys, 1))
        self.rc = new_cache(max(rc_keys, 1))
        self.flags = np.zeros(FLAGS_SIZE, np.int64)
        self.rc_cut = self.l2_cut = 0
        if seed_keys is not None and len(seed_keys):
            self.l2 = _grown(self.l2, int(seed_keys.max()) + 1)
            prev, nxt, resident, _, stamp, s = self.l2
            top = np.asarray(seed_keys[: self.l2_entries], np.int64)
            resident[top] = 1
            prev[top[1:]] = top[:-1]
            nxt[top[:-1]] = top[1:]
            stamp[top] = np.arange(len(top), 0, -1)
            s[HEAD], s[TAIL], s[SIZE], s[COUNTER] = top[0], top[-1], len(top), len(top)
        self.l2_base = np.zeros(CACHE_SCALARS, np.int64)  # what seeding added: not this pair's counts
        self.l2_base[:] = self.l2[5]

    def feed(self, key: np.ndarray, kind: np.ndarray, rlog: np.ndarray) -> None:
        if len(key):
            top = int(key.max()) + 1
            if top > len(self.l2[0]):
                self.l2 = _grown(self.l2, max(top, 2 * len(self.l2[0])))
        if len(rlog):
            top = int(rlog[:, RL_KEY].max()) + 1
            if top > len(self.rc[0]):
                self.rc = _grown(self.rc, max(top, 2 * len(self.rc[0])))
        _coupled_step(key, kind, rlog, self.l2, self.rc, self.flags, self.l2_entries, self.rc_entries)

    def clean(self, ticks: int) -> None:
        """Ticks of the cache-clean timer: both caches (qcow2's cache_clean_timer_cb cleans each)."""
        for _ in range(min(ticks, 2)):
            for cache, cut in ((self.l2, self.l2_cut), (self.rc, self.rc_cut)):
                if cut > 0:
                    _clean_step(*cache[:5], cut, cache[5])
            self.l2_cut, self.rc_cut = int(self.l2[5][COUNTER]), int(self.rc[5][COUNTER])

    def finish(self) -> RefcountCounts:
        """Counters so far, the close's write-backs being what is still dirty (L2 first, then refcount)."""
        s, l2 = self.rc[5], self.l2[5] - self.l2_base
        return RefcountCounts(
            lookups=int(s[LOOKUPS]), misses=int(s[LOOKUPS] - s[HITS]), disk_reads=int(s[READS]),
            evictions=int(s[EVICTED]), writebacks=int(s[WRITTEN]), writebacks_at_close=int(self.rc[3].sum()),
            cleaned=int(s[CLEANED]), divergence=int(self.flags[DIVERGENCE]), l2_misses=int(l2[LOOKUPS] - l2[HITS]),
            l2_disk_reads=int(l2[READS]), l2_evictions=int(l2[EVICTED]), l2_writebacks=int(l2[WRITTEN]),
            l2_writebacks_at_close=int(self.l2[3].sum()))
