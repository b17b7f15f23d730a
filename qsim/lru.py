"""Stage 2 of the replay: an L2 cache event stream -> hits, misses, evictions and write-backs for many cache sizes.

QEMU's qcow2 cache is one fully associative LRU (block/qcow2-cache.c), so Mattson's stack algorithm applies: one
pass computes every access's reuse (stack) distance -- the number of distinct slices touched since the previous
access of the same slice, plus one -- and an access hits in a cache of C entries exactly when its distance is at
most C. Misses for every size then come from one histogram. Evictions follow (a cache never shrinks, so every miss
after the first C evicts). Write-backs depend on dirtiness and flushes, so they get a second compiled pass that
carries a dirty bit per size.
For a handful of sizes, simulating each cache directly (O(1) per access) is faster still.

Cache cleaning (QEMU's ``cache-clean-interval``, block/qcow2-cache.c qcow2_cache_clean_unused): at each tick of
the timer, every entry that is clean, not in use and not used since the previous tick is dropped (``CacheModel.
clean``). While nothing is dirty, that cuts the LRU stack at the same point for every size: the one pass drops the
marks older than the previous tick (their next access counts as a first one), and evictions come from a histogram
of how many slices were live before each first access (a clean turns later evictions into fills). A dirty entry
survives a tick in the caches where it is still dirty and cached, and those differ by size; so at the first tick
with dirt the one-pass state becomes one direct simulation per size (exact: residency, dirty bits, write-backs and
last-use order carry over), and the trace goes on there. Read-only traces, and traces shorter than one interval
(most recordings, with the 600 s default), stay on the one-pass path.

All kernels carry their state in arrays, so a trace can be fed in chunks (``CacheModel.feed``) with results equal
to one whole pass: that is how traces larger than memory stream. The sequential kernels are ``_distances_step``
(a bitmap of live access times with a Fenwick tree over its 64-bit words, compacted whenever it fills, so for 32768
slices the two take 24 KiB and stay in L1; a distance costs one short tree walk and one popcount),
``_writebacks_step`` (every size in one pass, a dirty bit per size) and ``_simulate_step``; the tests hold
plain-Python references beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .bitops import popcount64, trailing_zeros64
from .codes import GET, GET_DIRTY, GET_EMPTY

COLD = np.iinfo(np.int64).max  # distance of a first access: a miss in every cache
DIRECT_SIMULATION_MAX_SIZES = 3
# scalar state of the distance kernel
D_MARKS, D_TIME, D_LAST_KEY, D_SAVED = range(4)  # D_SAVED: the newest mark's position at the last clean tick
# scalar state of a direct simulation
S_HEAD, S_TAIL, S_SIZE, S_HITS, S_READS, S_WRITTEN, S_EVICTED, S_CLEANED = range(8)
SIM_STATE_SIZE = 8


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
def _compact(tree, bits, key_at, mark_of_key, t, scalars):
    """Renumber the live marks (positions 1..t) as 1..marks, keeping their order (and the saved tick position with
    them); rebuild bits and tree. Returns the new newest position (= live marks)."""
    pos = 0
    saved = scalars[D_SAVED]
    new_saved = 0
    for w in range((t >> 6) + 1):
        word = bits[w]
        while word != 0:
            old = (w << 6) + trailing_zeros64(word)
            word &= word - 1
            pos += 1
            if old <= saved:
                new_saved = pos
            key = key_at[old]
            mark_of_key[key] = pos
            key_at[pos] = key  # pos <= old: an entry not yet read is never overwritten
    scalars[D_SAVED] = new_saved
    bits[:] = 0
    for p in range(1, pos + 1):
        bits[p >> 6] |= np.int64(1) << (p & 63)
    tree[:] = 0
    for w in range(pos >> 6):  # complete words only: the newest word stays out of the tree
        tree[w + 1] = popcount64(bits[w])
    for j in range(1, tree.shape[0]):  # linear Fenwick build
        parent = j + (j & -j)
        if parent < tree.shape[0]:
            tree[parent] += tree[j]
    return pos


@njit(cache=True, nogil=True)
def _distances_step(keys, kinds, tree, bits, key_at, mark_of_key, scalars, dist, hist, empty_hist, cold_hist):
    """Stack distances of ``keys`` (written to ``dist``; counted into ``hist`` and, for GET_EMPTY accesses, which
    never read the disk, ``empty_hist``, clipped at n_keys + 1 = cold), continuing from earlier chunks' state.

    Every key's latest access holds a mark at its position in time (1, 2, ...): ``bits`` is the set of live marks,
    ``tree`` a Fenwick tree of the marks per 64-position word, for every word before the newest (which is counted
    with one popcount, so a step mostly touches one word). A distance is the live marks from the key's own mark on.
    The marks' order is the keys' last-access order. ``scalars``: live marks, newest position, last key."""
    size = key_at.shape[0]
    marks = scalars[D_MARKS]
    t = scalars[D_TIME]
    last_key = scalars[D_LAST_KEY]
    n_keys = mark_of_key.shape[0]
    keep = dist.shape[0] > 0  # distances are kept only when write-backs need them
    for i in range(keys.shape[0]):
        k = keys[i]
        if k == last_key:  # the same slice again: distance 1, and its mark is already the newest
            if keep:
                dist[i] = 1
            hist[1] += 1
            if kinds[i] == GET_EMPTY:
                empty_hist[1] += 1
            continue
        last_key = k
        if t + 1 >= size:
            t = _compact(tree, bits, key_at, mark_of_key, t, scalars)
        p = mark_of_key[k]
        if p == 0:
            if keep:
                dist[i] = COLD
            cold_hist[min(marks, n_keys + 1)] += 1  # the slices cached before it: it evicts in caches that full
            marks += 1
            bucket = n_keys + 1
        else:
            w = p >> 6
            at_or_before = _fenwick_prefix(tree, w) + popcount64(bits[w] & ~(np.int64(-2) << (p & 63)))
            d = marks - at_or_before + 1
            if keep:
                dist[i] = d
            bucket = min(d, n_keys + 1)
            bits[w] &= ~(np.int64(1) << (p & 63))
            if w != t >> 6:  # a complete word: its count is in the tree
                _fenwick_add(tree, w + 1, -1)
        hist[bucket] += 1
        if kinds[i] == GET_EMPTY:
            empty_hist[bucket] += 1
        t += 1
        w = t >> 6
        if (t & 63) == 0:  # the previous word is complete: into the tree with it
            _fenwick_add(tree, w, popcount64(bits[w - 1]))
        bits[w] |= np.int64(1) << (t & 63)
        mark_of_key[k] = t
        key_at[t] = k
    scalars[D_MARKS] = marks
    scalars[D_TIME] = t
    scalars[D_LAST_KEY] = last_key


def stack_distances(keys: np.ndarray, n_keys: int, tree_size: int = 0) -> np.ndarray:
    """Stack distance of every access (COLD for first accesses), in one pass. ``tree_size`` (tests only) forces a
    small tree so compaction runs often."""
    return _DistanceState(n_keys, tree_size).step(keys, np.zeros(len(keys), np.uint8))


class _DistanceState:
    def __init__(self, n_keys: int, tree_size: int = 0):
        self.tree_size = tree_size
        size = self._marks_size(n_keys)
        words = (size >> 6) + 1
        self.bits = np.zeros(words, dtype=np.int64)
        self.tree = np.zeros(words + 1, dtype=np.int32)
        self.key_at = np.zeros(size, dtype=np.int64)
        self.mark_of_key = np.zeros(n_keys, dtype=np.int64)
        self.scalars = np.array([0, 0, -1, 0], dtype=np.int64)
        self.hist = np.zeros(n_keys + 2, np.int64)  # accesses by distance, clipped: n_keys + 1 = cold
        self.empty_hist = np.zeros(n_keys + 2, np.int64)  # the same for GET_EMPTY accesses (no disk read)
        self.cold_hist = np.zeros(n_keys + 2, np.int64)  # first accesses (and first after a clean) by live marks

    def _marks_size(self, n_keys: int) -> int:
        # About four times the distinct keys, so compaction is rare; bits and tree stay small enough for L1.
        return self.tree_size if self.tree_size > n_keys + 1 else max(4 * n_keys, 1 << 16) + 1

    def grow(self, n_keys: int) -> None:
        """Room for keys 0 .. n_keys-1 (more than before): the same distances as if sized so from the start."""
        old = self.mark_of_key.shape[0]
        self.mark_of_key = np.concatenate([self.mark_of_key, np.zeros(n_keys - old, np.int64)])
        for name in ("hist", "empty_hist", "cold_hist"):
            hist = getattr(self, name)
            grown = np.zeros(n_keys + 2, np.int64)
            grown[: old + 1] = hist[: old + 1]
            grown[n_keys + 1] = hist[old + 1]  # the clipped bucket moves to the new end
            setattr(self, name, grown)
        size = self._marks_size(n_keys)
        if size > self.key_at.shape[0]:  # more marks: copy them over, then renumber into the larger arrays
            t = int(self.scalars[D_TIME])
            bits = np.zeros((size >> 6) + 1, dtype=np.int64)
            bits[: self.bits.shape[0]] = self.bits
            key_at = np.zeros(size, dtype=np.int64)
            key_at[: t + 1] = self.key_at[: t + 1]
            self.bits, self.key_at, self.tree = bits, key_at, np.zeros(bits.shape[0] + 1, dtype=np.int32)
            self.scalars[D_TIME] = _compact(self.tree, self.bits, self.key_at, self.mark_of_key, t, self.scalars)

    def step(self, keys: np.ndarray, kinds: np.ndarray, keep: bool = True) -> np.ndarray:
        dist = np.empty(len(keys) if keep else 0, dtype=np.int64)
        _distances_step(keys, kinds, self.tree, self.bits, self.key_at, self.mark_of_key, self.scalars, dist,
                        self.hist, self.empty_hist, self.cold_hist)
        return dist

    def cut(self) -> tuple[int, int]:
        """A clean tick with nothing dirty anywhere: drop every mark at or before the previous tick's position (in
        every cache those slices are clean and unused since that tick), then save the newest position. Returns
        (live marks before, marks dropped): the dropped are the bottom of the stack."""
        live = int(self.scalars[D_MARKS])
        _cut(self.tree, self.bits, self.key_at, self.mark_of_key, self.scalars)
        self.scalars[D_SAVED] = self.scalars[D_TIME]
        return live, live - int(self.scalars[D_MARKS])


@njit(cache=True, nogil=True)
def _cut(tree, bits, key_at, mark_of_key, scalars):
    upto = scalars[D_SAVED]
    t = scalars[D_TIME]
    removed = 0
    for w in range((upto >> 6) + 1):
        word = bits[w] & _low_bits(upto + 1 - (w << 6))
        if word == 0:
            continue
        n = popcount64(word)
        bits[w] &= ~word
        removed += n
        if w != t >> 6:  # a complete word: its count is in the tree
            _fenwick_add(tree, w + 1, -n)
        while word != 0:
            p = (w << 6) + trailing_zeros64(word)
            word &= word - 1
            mark_of_key[key_at[p]] = 0
    scalars[D_MARKS] -= removed
    scalars[D_LAST_KEY] = -1  # the next access takes the full path: its mark must move past this tick


@njit(cache=True)
def _sizes_below(entries, distance):
    """How many of the (ascending) cache sizes are smaller than ``distance``: the caches that missed."""
    lo = 0
    hi = entries.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if entries[mid] < distance:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, inline="always")
def _low_bits(count):
    """A word with its lowest ``count`` bits set (all 64 for count >= 64)."""
    return np.int64(-1) if count >= 64 else (np.int64(1) << count) - 1


@njit(cache=True, nogil=True)
def _writebacks_step(keys, kinds, dist, flush_at, flushes, entries, dirty, last_flushes, written):
    """Dirty entries written back, for every cache size (``entries``, ascending) in one pass, continuing earlier
    chunks' state.

    ``dirty[k]`` holds one bit per size (bit s of word s // 64): slice k is dirty in that cache. Between two accesses
    of a slice its dirty copy is written back, in every cache, if a flush fell between them (``flush_at``: this
    chunk's flushes, one before event ``flush_at[j]``; ``flushes`` the count before the chunk; ``last_flushes[k]``
    the count at k's last access), and in each cache too small to have kept it (entries < distance) when it was
    evicted. GET_DIRTY and GET_EMPTY accesses dirty it in every cache."""
    n_sizes = entries.shape[0]
    every_size = np.empty(dirty.shape[1], np.int64)  # a slice dirty in every cache
    for w in range(dirty.shape[1]):
        every_size[w] = _low_bits(n_sizes - (w << 6))
    f = 0
    for i in range(keys.shape[0]):
        while f < flush_at.shape[0] and flush_at[f] <= i:
            f += 1
        flush_count = flushes + f
        k = keys[i]
        cleaned = n_sizes if flush_count > last_flushes[k] else _sizes_below(entries, dist[i])
        for w in range(min(dirty.shape[1], (cleaned + 63) >> 6)):
            bits = dirty[k, w]
            if bits == 0:
                continue
            mask = _low_bits(cleaned - (w << 6))
            out = bits & mask
            while out != 0:
                written[(w << 6) + trailing_zeros64(out)] += 1
                out &= out - 1
            dirty[k, w] = bits & ~mask
        last_flushes[k] = flush_count
        if kinds[i] == GET_DIRTY or kinds[i] == GET_EMPTY:
            dirty[k, :] = every_size


@njit(cache=True, nogil=True)
def _writebacks_finish(entries, dirty, last_flushes, forward_distinct, total_flushes, written, left):
    """Per size: write-backs after each key's last access (a later flush, or evicted by what came after), and
    entries still dirty at the end of the trace."""
    for k in range(dirty.shape[0]):
        for w in range(dirty.shape[1]):
            bits = dirty[k, w]
            while bits != 0:
                s = (w << 6) + trailing_zeros64(bits)
                bits &= bits - 1
                if forward_distinct[k] >= entries[s] or total_flushes > last_flushes[k]:
                    written[s] += 1
                else:
                    left[s] += 1


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


@njit(cache=True, nogil=True)
def _simulate_step(keys, kinds, flush_at, entries, prev, nxt, resident, dirty, stamp, base, s):
    """One LRU cache of ``entries`` entries, simulated directly (keys are dense ints: the LRU list is two arrays),
    continuing from state ``s`` (head, tail, size, hits, disk reads, write-backs, evictions, cleaned). ``flush_at``:
    this chunk's whole-cache flushes, one before event ``flush_at[j]`` (or after the last event). ``stamp[k]``: the
    access number (1, 2, ...; ``base`` accesses came before this chunk) of k's last use, what cleaning reads."""
    head, tail, size = s[S_HEAD], s[S_TAIL], s[S_SIZE]
    f = 0
    for i in range(keys.shape[0]):
        if f < flush_at.shape[0] and flush_at[f] <= i:  # a whole-cache flush writes every dirty resident entry
            while f < flush_at.shape[0] and flush_at[f] <= i:
                f += 1
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
                s[S_EVICTED] += 1
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
        stamp[k] = base + i + 1
        if kinds[i] == GET_DIRTY or kinds[i] == GET_EMPTY:
            dirty[k] = 1
    if f < flush_at.shape[0]:  # flushes after the chunk's last event
        s[S_WRITTEN] += _flush_all(nxt, dirty, head)
    s[S_HEAD], s[S_TAIL], s[S_SIZE] = head, tail, size


@njit(cache=True, nogil=True)
def _clean_step(prev, nxt, resident, dirty, stamp, cut, s):
    """qcow2_cache_clean_unused on one directly simulated cache: drop every resident entry not dirty and last used
    at or before access number ``cut`` (the count at the previous tick). Those are a run at the LRU end of the
    list, dirty ones among them staying where they are."""
    k = s[S_TAIL]
    while k >= 0 and stamp[k] <= cut:
        up = prev[k]
        if not dirty[k]:
            q = nxt[k]
            if up >= 0:
                nxt[up] = q
            else:
                s[S_HEAD] = q
            if q >= 0:
                prev[q] = up
            else:
                s[S_TAIL] = up
            resident[k] = 0
            s[S_SIZE] -= 1
            s[S_CLEANED] += 1
        k = up


def simulate(keys, kinds, flush_at, n_keys, entries):
    """A whole stream through one cache: (hits, disk reads, write-backs during the trace, dirty left at the end)."""
    model = CacheModel(n_keys, [entries], direct=True)
    model.feed(keys, kinds, flush_at)
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
    cleaned: int = 0  # entries dropped by cache cleaning


assert GET == 0 and GET_DIRTY != 0 and GET_EMPTY != 0  # CacheModel.feed tests for dirt with kind.any()


class CacheModel:
    """Caches of several sizes (entry counts) fed one event stream, in one or many chunks.

    ``direct`` simulates each size (best for a few sizes); otherwise one stack-distance pass serves all sizes and
    write-backs get a pass per size only once dirty entries exist. ``clean`` is one tick of QEMU's cache cleaning
    between two chunks; a tick with dirt moves a one-pass model to direct simulations (see the module's notes)."""

    def __init__(self, n_keys: int, entries: list[int], direct: bool | None = None):
        """``n_keys``: keys expected (slice ids 0 .. n_keys-1); the model grows when a larger key comes, so this
        is a starting size, not a bound, and memory follows the slices the trace really touches."""
        self.n_keys = max(n_keys, 1)
        self.asked = list(entries)
        self.entries = sorted(set(entries))  # each size once: QEMU's rules map many asked sizes to the same cache
        self.entries_array = np.asarray(self.entries, np.int64)
        self.direct = len(self.entries) <= DIRECT_SIMULATION_MAX_SIZES if direct is None else direct
        self.lookups = 0
        self.flushes = 0
        self.ticks = 0
        self.clean_cut = 0  # QEMU's cache_clean_lru_counter: the access count at the previous tick
        self.cuts: list[tuple[int, int]] = []  # one-pass cleans: (live slices before, slices dropped)
        if self.direct:
            self.sims = [self._empty_sim() for _ in self.entries]
        else:
            self.distances = _DistanceState(self.n_keys)
            self.dirty_state = None  # dirty bits, last flushes, written per size -- created at the first dirt

    def _empty_sim(self):
        return (np.full(self.n_keys, -1, np.int64), np.full(self.n_keys, -1, np.int64),
                np.zeros(self.n_keys, np.uint8), np.zeros(self.n_keys, np.uint8), np.zeros(self.n_keys, np.int64),
                np.array([-1, -1, 0, 0, 0, 0, 0, 0], np.int64))

    def feed(self, key: np.ndarray, kind: np.ndarray, flush_at: np.ndarray):
        """Add a chunk of events; ``flush_at`` are this chunk's flush positions, ascending (a flush before event j;
        j = len(key) is a flush after the chunk's last event)."""
        if len(key):
            top = int(key.max()) + 1
            if top > self.n_keys:
                self.grow(max(top, 2 * self.n_keys))
        if self.direct:
            for e, (prev, nxt, resident, dirty, stamp, s) in zip(self.entries, self.sims):
                _simulate_step(key, kind, flush_at, e, prev, nxt, resident, dirty, stamp, self.lookups, s)
        else:
            dirties = self.dirty_state is None and bool(kind.any())  # GET is 0: any other kind dirties its slice
            dist = self.distances.step(key, kind, keep=self.dirty_state is not None or dirties)
            if dirties:
                # Nothing was dirty before this chunk, so no earlier access owes a write-back: start from zeros.
                self.dirty_state = (np.zeros((self.n_keys, (len(self.entries) + 63) // 64), np.int64),
                                    np.zeros(self.n_keys, np.int64), np.zeros(len(self.entries), np.int64))
            if self.dirty_state is not None:
                _writebacks_step(key, kind, dist, flush_at, self.flushes, self.entries_array, *self.dirty_state)
        self.lookups += len(key)
        self.flushes += len(flush_at)

    def grow(self, n_keys: int) -> None:
        """Room for keys 0 .. n_keys-1: every cache's state as if it had been that large from the start."""
        extra = n_keys - self.n_keys
        if extra <= 0:
            return
        if self.direct:
            self.sims = [(np.concatenate([prev, np.full(extra, -1, np.int64)]),
                          np.concatenate([nxt, np.full(extra, -1, np.int64)]),
                          np.concatenate([resident, np.zeros(extra, np.uint8)]),
                          np.concatenate([dirty, np.zeros(extra, np.uint8)]),
                          np.concatenate([stamp, np.zeros(extra, np.int64)]), s)
                         for prev, nxt, resident, dirty, stamp, s in self.sims]
        else:
            self.distances.grow(n_keys)
            if self.dirty_state is not None:
                dirty, last_flushes, written = self.dirty_state
                self.dirty_state = (np.concatenate([dirty, np.zeros((extra, dirty.shape[1]), np.int64)]),
                                    np.concatenate([last_flushes, np.zeros(extra, np.int64)]), written)
        self.n_keys = n_keys

    def clean(self, ticks: int = 1) -> None:
        """``ticks`` ticks of the cache-clean timer after everything fed so far (cache_clean_timer_cb): each drops,
        in every cache, the entries that are clean and unused since the previous tick, then saves the count."""
        self.ticks += ticks
        for _ in range(min(ticks, 2)):  # with nothing used in between, a third tick finds nothing a second did not
            if not self.direct and self.dirty_state is None:
                # nothing dirty in any cache: the clean cuts the LRU stack at the same point for every size
                live, dropped = self.distances.cut()
                if dropped:
                    self.cuts.append((live, dropped))
            else:
                if not self.direct:  # dirty slices survive a tick only where they are still cached: one per size
                    self._go_direct()
                if self.clean_cut > 0:  # until a tick has saved a count above 0, nothing qualifies
                    for prev, nxt, resident, dirty, stamp, s in self.sims:
                        _clean_step(prev, nxt, resident, dirty, stamp, self.clean_cut, s)
            self.clean_cut = self.lookups

    def _go_direct(self) -> None:
        """Turn the one-pass state into one direct simulation per size, equal to having simulated each from the
        start: the e most recently used live slices are resident (cleans so far cut the stack for every size),
        dirty where they were dirtied and neither flushed nor evicted since; every write-back owed so far is
        counted. Last-use stamps keep the order and which side of the previous tick each slice was used on."""
        d = self.distances
        mark = d.mark_of_key
        seen = np.flatnonzero(mark > 0)
        order = seen[np.argsort(mark[seen])[::-1]]  # most recent first
        after = int((mark[order] > d.scalars[D_SAVED]).sum())  # used since the previous tick: the first ones
        stamps = np.empty(len(order), np.int64)
        stamps[:after] = self.clean_cut + after - np.arange(after)
        stamps[after:] = self.clean_cut - np.arange(len(order) - after)
        counts = self._finish_each()
        flushed = None
        if self.dirty_state is not None:
            dirty_bits, last_flushes, _ = self.dirty_state
            flushed = last_flushes < self.flushes
        sims = []
        for n, (e, c) in enumerate(zip(self.entries, counts)):
            prev, nxt, resident, dirty, stamp, s = self._empty_sim()
            top = order[:e]
            resident[top] = 1
            if len(top):
                prev[top[1:]] = top[:-1]
                nxt[top[:-1]] = top[1:]
                s[S_HEAD], s[S_TAIL], s[S_SIZE] = top[0], top[-1], len(top)
            stamp[order] = stamps
            written = c.writebacks  # write-backs owed so far: flushes and evictions (what finish counts)
            if self.dirty_state is not None:
                bit = (dirty_bits[:, n >> 6] >> (n & 63)) & 1
                still = (bit == 1) & (resident == 1) & ~flushed
                dirty[still] = 1
                written = int(self.dirty_state[2][n]) + int(((bit == 1) & ~still).sum())
            s[S_HITS], s[S_READS], s[S_WRITTEN] = c.hits, c.disk_reads, written
            s[S_EVICTED], s[S_CLEANED] = c.evictions, c.cleaned
            sims.append((prev, nxt, resident, dirty, stamp, s))
        self.sims = sims
        self.direct = True
        del self.distances
        self.dirty_state = None

    def recency(self) -> np.ndarray:
        """The keys cached, most recently used first (the largest cache's, when each size is simulated)."""
        if self.direct:
            prev, nxt, resident, dirty, stamp, s = self.sims[-1]
            out = []
            k = int(s[S_HEAD])
            while k >= 0:
                out.append(k)
                k = int(nxt[k])
            return np.asarray(out, np.int64)
        mark = self.distances.mark_of_key
        seen = np.flatnonzero(mark > 0)
        return seen[np.argsort(mark[seen])[::-1]]

    def _cleaned_live(self, entries: int) -> int:
        """Entries a cache of ``entries`` lost to the one-pass cleans: of the dropped bottom of the stack, those
        within its top ``entries``."""
        return sum(max(0, min(entries, live) - (live - dropped)) for live, dropped in self.cuts)

    def finish(self) -> list[CacheCounts]:
        """Counters per asked size, in the order asked."""
        counts = {c.entries: c for c in self._finish_each()}
        return [counts[e] for e in self.asked]

    def _finish_each(self) -> list[CacheCounts]:
        out = []
        if self.direct:
            for e, (_, _, _, dirty, _, s) in zip(self.entries, self.sims):
                hits = int(s[S_HITS])
                out.append(CacheCounts(e, self.lookups, hits, self.lookups - hits, int(s[S_READS]),
                                       int(s[S_EVICTED]), int(s[S_WRITTEN]), int(dirty.sum()), int(s[S_CLEANED])))
            return out
        mark = self.distances.mark_of_key  # live marks are in last-access order
        seen = mark > 0
        order = np.argsort(mark[seen])
        rank = np.empty(int(seen.sum()), np.int64)
        rank[order] = np.arange(len(rank))
        forward = np.full(self.n_keys, -1, np.int64)  # distinct keys accessed after each key's last access
        forward[seen] = len(rank) - 1 - rank
        hist, empty_hist = self.distances.hist, self.distances.empty_hist
        tail = np.zeros(len(self.entries), np.int64)
        left = np.zeros(len(self.entries), np.int64)
        if self.dirty_state is not None:
            dirty, last_flushes, written = self.dirty_state
            _writebacks_finish(self.entries_array, dirty, last_flushes, forward, self.flushes, tail, left)
            tail += written
        cold_hist = self.distances.cold_hist
        reused = hist[:-1].sum()  # accesses that were not first ones (cold: the last bucket)
        for k, e in enumerate(self.entries):
            top = min(e, self.n_keys)
            hits = int(hist[1: top + 1].sum())
            empty_misses = int(empty_hist.sum() - empty_hist[1: top + 1].sum())
            misses = self.lookups - hits
            # a miss evicts when the cache is full: always for a reuse beyond it; for a first access (or the first
            # after a clean) when at least e slices were live before it
            evictions = int(reused - hits + cold_hist[min(e, self.n_keys + 1):].sum())
            cleaned = int(self._cleaned_live(e))
            out.append(CacheCounts(e, self.lookups, hits, misses, misses - empty_misses, evictions, int(tail[k]),
                                   int(left[k]), cleaned))
        return out


def counts_for_sizes(key: np.ndarray, kind: np.ndarray, flush_at: np.ndarray, n_keys: int,
                     entries: list[int], direct: bool | None = None) -> list[CacheCounts]:
    """Counters for each cache size from one whole event stream."""
    model = CacheModel(n_keys, entries, direct)
    model.feed(key, kind, flush_at)
    return model.finish()
