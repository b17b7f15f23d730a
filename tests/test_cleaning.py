"""Cache cleaning (QEMU's cache-clean-interval) in stage 2, held to a plain-Python cache that follows
qcow2_cache_clean_unused line by line: at each tick, drop every entry that is not dirty and whose last use
(lru_counter) is at or before the counter saved at the previous tick; then save the counter."""

import numpy as np
import pytest
from test_lru import reference_lru

from qsim.codes import GET, GET_DIRTY, GET_EMPTY
from qsim.lru import CacheModel


def fed_with_ticks(keys, kinds, flush_at, tick_at, sizes, direct):
    """The model fed in chunks cut at every tick (as the replay feeds it), with a clean between chunks."""
    model = CacheModel(int(keys.max()) + 1 if len(keys) else 1, sizes, direct)
    start = 0
    for cut in sorted(set(tick_at.tolist()) | {len(keys)}):
        local = flush_at[(flush_at >= start) & (flush_at <= cut)] - start
        model.feed(keys[start:cut], kinds[start:cut], local)
        flush_at = flush_at[flush_at > cut]
        model.clean(int((tick_at == cut).sum()))
        start = cut
    return model.finish()


def random_stream(rng, n, n_keys, dirty_share):
    keys = rng.integers(0, n_keys, n).astype(np.int64)
    p_dirty = dirty_share / 2
    kinds = rng.choice([GET, GET_DIRTY, GET_EMPTY], n, p=[1 - dirty_share, p_dirty, p_dirty]).astype(np.uint8)
    flush_at = np.sort(rng.choice(n + 1, size=rng.integers(0, max(n // 30, 1)), replace=False)).astype(np.int64)
    tick_at = np.sort(rng.integers(0, n + 1, int(rng.integers(1, 40)))).astype(np.int64)  # repeats: idle intervals
    return keys, kinds, flush_at, tick_at


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("dirty_share", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("seed", range(8))
def test_cleaning_equals_the_reference(seed, dirty_share, direct):
    rng = np.random.default_rng(300 + seed)
    n_keys = int(rng.integers(1, 80))
    keys, kinds, flush_at, tick_at = random_stream(rng, int(rng.integers(1, 2500)), n_keys, dirty_share)
    if seed % 2:  # clean for the first half: one-pass cuts first, then the move to one cache per size
        kinds[: len(kinds) // 2] = GET
    sizes = [1, 2, 3, 5, 9, 16, 40, 100]
    for entries, ours in zip(sizes, fed_with_ticks(keys, kinds, flush_at, tick_at, sizes, direct)):
        ref = reference_lru(keys.tolist(), kinds.tolist(), flush_at.tolist(), entries, tick_at.tolist())
        got = dict(lookups=ours.lookups, hits=ours.hits, misses=ours.misses, disk_reads=ours.disk_reads,
                   evictions=ours.evictions, writebacks=ours.writebacks, cleaned=ours.cleaned,
                   writebacks_at_close=ours.writebacks_at_close)
        assert got == ref, (entries, seed)


def test_an_entry_survives_two_ticks_without_use_and_dirty_ones_stay():
    # slices 0 (read) and 1 (dirtied) used before tick 1; 2 used between ticks 1 and 2; all re-read after tick 3
    keys = np.array([0, 1, 2, 0, 1, 2], np.int64)
    kinds = np.array([GET, GET_DIRTY, GET, GET, GET, GET], np.uint8)
    model = CacheModel(3, [8])
    model.feed(keys[:2], kinds[:2], np.zeros(0, np.int64))
    model.clean()  # tick 1: nothing was saved before it
    model.feed(keys[2:3], kinds[2:3], np.zeros(0, np.int64))
    model.clean()  # tick 2: drops 0 (clean, unused since tick 1); 1 is dirty
    model.clean()  # tick 3: drops 2
    model.feed(keys[3:], kinds[3:], np.zeros(0, np.int64))
    c = model.finish()[0]
    assert (c.misses, c.cleaned, c.evictions, c.writebacks_at_close) == (5, 2, 0, 1)


def test_without_ticks_nothing_changes():
    rng = np.random.default_rng(5)
    keys, kinds, flush_at, _ = random_stream(rng, 3000, 50, 0.3)
    for direct in (False, True):
        a = CacheModel(50, [1, 4, 20, 64], direct)
        a.feed(keys, kinds, flush_at)
        b = CacheModel(50, [1, 4, 20, 64], direct)
        b.feed(keys, kinds, flush_at)
        b.clean()  # one tick drops nothing: QEMU's saved counter starts at 0
        assert a.finish() == b.finish()


# --- against a real QEMU: timed replays through qemu-system (qemu-io never cleans) --------------------------------

K, M, G = 1 << 10, 1 << 20, 1 << 30
INTERVAL = 600  # the trace's clock: QEMU's default interval; QEMU gets interval 1 s and the times / 600
BURSTS = (0.4, 1.5, 2.6, 4.5)  # in intervals: a third of an interval or more from every tick, gaps of 1 to 2


def timed_trace(seed: int, span: int, writes: float, slices: int = 24):
    """Bursts of 4k reads and writes over a pool of slices (32 MiB apart with 4k slices: one slice each), so
    later bursts re-touch slices used one, two and three intervals earlier; writes leave slices dirty."""
    from qsim.trace import READ, WRITE, Trace

    rng = np.random.default_rng(seed)
    pool = (rng.permutation(span // (32 * M))[:slices] * 32 * M).astype(np.int64)
    op, offset, time = [], [], []
    for b, start in enumerate(BURSTS):
        n = int(rng.integers(8, 20))
        chosen = pool[rng.integers(0, slices // 2 + b * 3, n) % slices]  # later bursts reach further into the pool
        for k, base in enumerate(chosen):
            op.append(WRITE if rng.random() < writes else READ)
            offset.append(int(base) + int(rng.integers(0, 8)) * 64 * K)
            time.append((start + 0.08 * k / n) * INTERVAL)
    return Trace.from_arrays(op, offset, [4096] * len(op), time, f"<timed {seed}>")


def _qemu_systems() -> list[str]:
    import os
    import shutil

    from conftest import REQUIRE_QEMU

    found = []
    for prefix in os.environ.get("QSIM_QEMU_PREFIXES", "/usr/bin").split(":"):
        path = shutil.which("qemu-system-x86_64", path=prefix)
        if path is None and REQUIRE_QEMU:
            pytest.fail(f"qemu-system-x86_64 not in {prefix} but QSIM_REQUIRE_QEMU=1 (apt-get install -y "
                        "qemu-system-x86; for 10.0 dpkg -x the bookworm-backports package into the prefix)")
        if path is not None:
            found.append(path)
    if not found:
        pytest.skip("qemu-system-x86_64 not found (apt-get install -y qemu-system-x86)")
    return found


TIMED_CASES = {  # name: (options, virtual size, l2-cache-size, write share, span of the slices touched)
    "preallocated, 4k slices x 16": (dict(preallocation="metadata"), 2 * G, 64 * K, 0.3, 2 * G),
    "preallocated, extended_l2, default cache": (dict(preallocation="metadata", extended_l2=True), 2 * G, None, 0.3,
                                                 2 * G),
    "empty, 4k slices x 16": (dict(), 8 * G, 64 * K, 0.5, G),  # two tables: new ones' get_empty fill the cache
    "empty, extended_l2, default cache": (dict(extended_l2=True), G, None, 0.5, G),
}
TIMED_COMPARED = ("l2_lookups", "l2_misses", "l2_disk_reads", "l2_writebacks", "l2_writebacks_at_close",
                  "image_file_bytes")


@pytest.mark.qemu
def test_timed_replays_match_qemu_system(qemu_img):
    """Cleaning on, in a real QEMU: every case on every qemu-system at once (one process each, a few seconds in
    all), the first case twice (the two runs must agree). Evictions are left out: QEMU's trace does not say
    when a slot was emptied by a clean, so a refill looks like an eviction there."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from qsim.imageopts import ImageOptions
    from qsim.qemusystem import replay_timed
    from qsim.replay import replay
    from qsim.scenario import Scenario

    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    jobs = []
    for binary in _qemu_systems():
        for n, (name, (options, size, l2, share, span)) in enumerate(TIMED_CASES.items()):
            for again in range(2 if n == 0 else 1):
                jobs.append((binary, name, again, timed_trace(n, span, share), size, ImageOptions(**options), l2))
    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = list(pool.map(lambda j: replay_timed(j[0], j[3], j[4], j[5], cache_clean_interval=1,
                                                    time_scale=INTERVAL, accel=accel, l2_cache_size=j[6]), jobs))
    by_case = {}
    for (binary, name, again, trace, size, options, l2), run in zip(jobs, runs):
        # deterministic only if every request went well away from every tick (cont + k s, a few ms late)
        phase = np.asarray(run.sent) % 1.0
        assert ((phase > 0.1) & (phase < 0.9)).all(), (binary, name, run.worst_lateness)
        by_case.setdefault((binary, name), []).append(run.counts)
        scenario = Scenario.of((l2,), None, options, size, cache_clean_interval=INTERVAL)
        ours = replay(trace, scenario).rows[0]
        theirs = run.counts
        assert {k: ours[k] for k in TIMED_COMPARED} == {k: theirs[k] for k in TIMED_COMPARED}, (binary, name)
        assert ours["l2_cleaned"] > 0
        uncleaned = replay(trace, Scenario.of((l2,), None, options, size, cache_clean_interval=0)).rows[0]
        assert uncleaned["l2_misses"] < ours["l2_misses"], name  # cleaning mattered, or the case proves nothing
    for key, counts in by_case.items():
        assert all(c == counts[0] for c in counts), key


def test_replay_cleans_from_the_trace_timestamps_and_says_when_it_cannot():
    from qsim.imageopts import ImageOptions
    from qsim.replay import replay
    from qsim.scenario import Scenario
    from qsim.trace import READ, Trace

    offsets = [0, 32 * M, 0, 32 * M]  # ticks at 600, 1200 (drops 32M), 1800 (drops 0): 32M misses again
    timed = Trace.from_arrays([READ] * 4, offsets, [4096] * 4, [300.0, 300.0, 900.0, 2100.0])
    untimed = Trace.from_arrays([READ] * 4, offsets, [4096] * 4)
    scenario = Scenario.of((64 * K,), None, ImageOptions(preallocation="metadata"), 2 * G)
    result = replay(timed, scenario)
    row = result.rows[0]
    assert (row["l2_misses"], row["l2_cleaned"], row["cache_clean_ticks"], row["cache_clean_interval"]) == \
        (3, 2, 3, 600)
    assert not result.notes
    off = replay(timed, Scenario.of((64 * K,), None, ImageOptions(preallocation="metadata"), 2 * G,
                                    cache_clean_interval=0)).rows[0]
    assert (off["l2_misses"], off["l2_cleaned"], off["cache_clean_interval"]) == (2, 0, 0)
    plain = replay(untimed, scenario)
    assert plain.rows[0]["cache_clean_interval"] is None and plain.rows[0]["l2_misses"] == 2
    assert any("no timestamps" in note for note in plain.notes)
    # an epoch-scale clock: millions of idle ticks cost two
    late = Trace.from_arrays([READ] * 4, offsets, [4096] * 4, [1.7e9, 1.7e9, 1.7e9 + 600, 1.7e9 + 1800])
    assert replay(late, scenario).rows[0]["l2_misses"] == 3


def test_the_interval_is_whole_seconds_as_qemu_takes_it():
    from qsim.errors import UsageError
    from qsim.scenario import Scenario

    for bad in (-1, 1.5, True, 2**32):
        with pytest.raises(UsageError):
            Scenario(cache_clean_interval=bad)
