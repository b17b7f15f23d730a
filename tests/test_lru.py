"""Stage 2 (qsim.lru) against a plain-Python LRU cache that tracks dirtiness and flushes, on random event streams."""

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsim.codes import GET, GET_DIRTY, GET_EMPTY
from qsim.lru import COLD, CacheModel, counts_for_sizes, simulate, stack_distances


def reference_lru(keys, kinds, flush_at, entries, tick_at=()):
    """QEMU's qcow2 cache, the obvious way: LRU of ``entries`` slots, dirty bits, whole-cache flushes, and an
    lru_counter per entry for the clean ticks (qcow2_cache_clean_unused). A tick at position j comes before event
    j, after the flushes at j (a request's own flushes come after the tick before it)."""
    cache = OrderedDict()  # key -> [dirty, lru_counter]
    counter = 0  # c->lru_counter
    saved = 0  # c->cache_clean_lru_counter
    c = dict(lookups=0, hits=0, misses=0, disk_reads=0, evictions=0, writebacks=0, cleaned=0)
    flushes, ticks = list(flush_at), list(tick_at)

    def flush():
        for entry in cache.values():
            if entry[0]:
                c["writebacks"] += 1
                entry[0] = False

    def tick():
        nonlocal saved
        for key in [k for k, (dirty, lru) in cache.items() if not dirty and lru <= saved]:
            del cache[key]
            c["cleaned"] += 1
        saved = counter

    for i in range(len(keys) + 1):
        while flushes and flushes[0] <= i:
            flushes.pop(0)
            flush()
        while ticks and ticks[0] <= i:
            ticks.pop(0)
            tick()
        if i == len(keys):
            break
        key, kind = keys[i], kinds[i]
        c["lookups"] += 1
        if key in cache:
            c["hits"] += 1
            cache.move_to_end(key)
        else:
            c["misses"] += 1
            if kind != GET_EMPTY:
                c["disk_reads"] += 1
            if len(cache) >= entries:
                _, (dirty, _) = cache.popitem(last=False)
                c["evictions"] += 1
                c["writebacks"] += int(dirty)
            cache[key] = [False, 0]
        counter += 1
        cache[key][1] = counter
        if kind in (GET_DIRTY, GET_EMPTY):
            cache[key][0] = True
    c["writebacks_at_close"] = sum(e[0] for e in cache.values())
    return c


def random_stream(rng, n, n_keys):
    keys = rng.integers(0, n_keys, n)
    kinds = rng.choice([GET, GET, GET, GET_DIRTY, GET_EMPTY], n).astype(np.uint8)
    flush_at = np.sort(rng.choice(n + 1, size=rng.integers(0, max(n // 5, 1)), replace=False))
    return keys.astype(np.int64), kinds, flush_at.astype(np.int64)


@pytest.mark.parametrize("seed", range(12))
def test_all_sizes_at_once_equal_one_simulation_per_size(seed):
    rng = np.random.default_rng(seed)
    n_keys = int(rng.integers(1, 60))
    keys, kinds, flush_at = random_stream(rng, int(rng.integers(1, 2500)), n_keys)
    sizes = [1, 2, 3, 4, 7, 16, 59, 100]
    for direct in (False, True):
        for entries, ours in zip(sizes, counts_for_sizes(keys, kinds, flush_at, n_keys, sizes, direct)):
            ref = reference_lru(keys.tolist(), kinds.tolist(), flush_at.tolist(), entries)
            assert (ours.lookups, ours.hits, ours.misses, ours.disk_reads, ours.evictions, ours.writebacks,
                    ours.writebacks_at_close) == (ref["lookups"], ref["hits"], ref["misses"], ref["disk_reads"],
                                                  ref["evictions"], ref["writebacks"], ref["writebacks_at_close"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=300), st.integers(12, 40))
def test_stack_distances_survive_tree_compaction(keys, tree_size):
    """A tiny tree forces compaction every few accesses; distances must not change."""
    keys = np.asarray(keys, dtype=np.int64)
    big = stack_distances(keys, 10)
    small = stack_distances(keys, 10, tree_size)
    assert big.tolist() == small.tolist()
    for entries in (1, 2, 5):
        ref = reference_lru(keys.tolist(), [GET] * len(keys), [], entries)
        assert int((small > entries).sum()) == ref["misses"]


@pytest.mark.parametrize("seed", range(8))
def test_direct_simulation_equals_the_reference(seed):
    rng = np.random.default_rng(100 + seed)
    n_keys = int(rng.integers(1, 50))
    keys, kinds, flush_at = random_stream(rng, int(rng.integers(1, 2000)), n_keys)
    for entries in (1, 2, 5, 13, 64):
        hits, reads, written, left = simulate(keys, kinds, flush_at, n_keys, entries)
        ref = reference_lru(keys.tolist(), kinds.tolist(), flush_at.tolist(), entries)
        assert (hits, reads, written, left) == (ref["hits"], ref["disk_reads"], ref["writebacks"],
                                                ref["writebacks_at_close"])
    few = counts_for_sizes(keys, kinds, flush_at, n_keys, [2, 5])
    many = counts_for_sizes(keys, kinds, flush_at, n_keys, [2, 5, 7, 9])
    assert few == many[:2]


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_feeding_chunks_equals_one_pass(seed, direct):
    """Streaming: any split of the stream into chunks gives the same counters."""
    rng = np.random.default_rng(200 + seed)
    n_keys = int(rng.integers(1, 40))
    keys, kinds, flush_at = random_stream(rng, int(rng.integers(50, 3000)), n_keys)
    kinds[: len(kinds) // 3] = GET  # dirt appears only in a later chunk
    sizes = [1, 3, 8, 50]
    whole = counts_for_sizes(keys, kinds, flush_at, n_keys, sizes, direct)
    model = CacheModel(n_keys, sizes, direct)
    cuts = np.sort(rng.choice(np.arange(1, len(keys)), size=min(5, len(keys) - 1), replace=False))
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(keys)]):
        local = flush_at[(flush_at >= a) & (flush_at < b)] - a
        if b == len(keys):
            local = flush_at[flush_at >= a] - a
        model.feed(keys[a:b], kinds[a:b], local)
    assert model.finish() == whole


def test_empty_stream():
    c = counts_for_sizes(np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64), 1, [2])[0]
    assert (c.lookups, c.misses, c.writebacks) == (0, 0, 0)


def test_distances_over_many_keys():
    """A hot set mixed with a wide cold range: short and long distances, marks in many words of the bitmap, tree
    updates and compactions; misses must equal the reference at every size."""
    rng = np.random.default_rng(7)
    n_keys = 6000
    hot = rng.integers(0, 40, 30000)
    cold = rng.integers(0, n_keys, 30000)
    keys = np.where(rng.random(30000) < 0.7, hot, cold).astype(np.int64)
    dist = stack_distances(keys, n_keys)
    for entries in (1, 8, 40, 300, 2500, 6000):
        ref = reference_lru(keys.tolist(), [GET] * len(keys), [], entries)
        assert int((dist > entries).sum()) == ref["misses"], entries
    assert (dist[dist < COLD] > 1000).sum() > 1000 and (dist <= 64).sum() > 10000


def test_write_backs_for_more_sizes_than_one_word_of_dirty_bits():
    """70 sizes: the dirty bits of a slice span two 64-bit words."""
    rng = np.random.default_rng(11)
    random_keys, random_kinds, random_flushes = random_stream(rng, 3000, 90)
    cyclic = np.tile(np.arange(64, dtype=np.int64), 30)  # every access after the first round at distance 64 exactly
    cyclic_kinds = rng.choice([GET, GET_DIRTY], len(cyclic)).astype(np.uint8)
    sizes = list(range(1, 71))
    for keys, kinds, flush_at in ((random_keys, random_kinds, random_flushes),
                                  (cyclic, cyclic_kinds, np.zeros(0, np.int64))):
        ours = counts_for_sizes(keys, kinds, flush_at, 90, sizes, direct=False)
        for entries in (1, 2, 40, 63, 64, 65, 66, 70):
            ref = reference_lru(keys.tolist(), kinds.tolist(), flush_at.tolist(), entries)
            c = ours[entries - 1]
            assert (c.misses, c.writebacks, c.writebacks_at_close) == (ref["misses"], ref["writebacks"],
                                                                       ref["writebacks_at_close"]), entries


@pytest.mark.parametrize("direct", [True, False])
def test_a_model_that_grows_counts_as_one_sized_from_the_start(direct):
    """Stage 2 starts at the slices an image has and grows as the trace creates tables (keys beyond its size):
    every counter equals a model sized for every key from the start, chunk by chunk, dirt and flushes included."""
    rng = np.random.default_rng(12)
    n, n_keys = (20_000, 3000) if direct else (90_000, 40_000)  # past 16k keys the marks' arrays grow too
    keys = np.minimum(rng.zipf(1.1, n), n_keys) - 1
    keys = np.where(np.arange(n) < n // 2, keys % 40, keys)  # few keys first, then the rest appear
    kinds = rng.choice([GET, GET, GET_DIRTY, GET_EMPTY], n).astype(np.uint8)
    flushes = np.sort(rng.choice(n, 60, replace=False))
    sizes = [1, 2, 7, 64, 500, 2999, 39_999, 50_000] if not direct else [3, 64, 2999]
    results = []
    for start in (n_keys, 1):
        model = CacheModel(start, sizes, direct=direct)
        for lo in range(0, n, 7000):
            hi = min(lo + 7000, n)
            local = flushes[(flushes >= lo) & (flushes < hi)] - lo
            model.feed(keys[lo:hi], kinds[lo:hi], local)
        results.append(model.finish())
    assert results[0] == results[1]
    assert results[0][0].misses > results[0][-1].misses > 0
