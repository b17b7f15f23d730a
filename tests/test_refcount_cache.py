"""QEMU's combined cache-size (what libvirt's metadata_cache max_size sets), split between the L2 and refcount
caches as read_cache_sizes splits it, checked against real QEMU: the L2 cache QEMU builds from cache-size alone,
below and above full coverage, gives qsim's counters.

qemu-io's -T trace is read as ``qsim validate`` reads it; the requests go through qemu-system's HMP qemu-io with
cleaning off (qsim.qemusystem), which gives qemu-io's counters and takes any drive option."""

import os

import numpy as np
import pytest

from qsim.cachecfg import CacheSettings, resolve_cache
from qsim.errors import QsimError
from qsim.geometry import ImageGeometry
from qsim.imageopts import ImageOptions
from qsim.scenario import ImageSpec, Scenario
from qsim.trace import READ, WRITE, Trace

K, M, G = 1 << 10, 1 << 20, 1 << 30


def test_the_split_follows_read_cache_sizes():
    g = ImageGeometry(2 * G, 65536)  # whole-disk L2 256k; refcount minimum 4 x 64k
    below = resolve_cache(g, CacheSettings(cache_size=384 * K))
    assert (below.l2_cache_bytes, below.refcount_cache_bytes, below.l2_cache_entry_size) == (128 * K, 256 * K, 4096)
    above = resolve_cache(g, CacheSettings(cache_size=M))
    assert (above.l2_cache_bytes, above.refcount_cache_bytes, above.l2_cache_entries) == (256 * K, 768 * K, 4)
    tiny = resolve_cache(g, CacheSettings(cache_size=128 * K))  # all of it to the refcount cache: L2 at its minimum
    assert (tiny.l2_cache_bytes, tiny.l2_cache_entries, tiny.refcount_cache_entries) == (0, 2, 4)
    with pytest.raises(QsimError, match="may not be set at the same time"):
        resolve_cache(g, CacheSettings(l2_cache_size=M, cache_size=2 * M, refcount_cache_size=M))
    with pytest.raises(QsimError, match="may not exceed cache-size"):
        resolve_cache(g, CacheSettings(l2_cache_size=2 * M, cache_size=M))


def _trace(seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    n = 600
    op = np.where(rng.random(n) < 0.2, WRITE, READ)
    offset = rng.integers(0, 2 * G // 4096, n) * 4096
    offset[n // 2:] = offset[rng.integers(0, n // 2, n - n // 2)]  # re-reads: hits in the larger caches
    return Trace.from_arrays(op, offset, [4096] * n, np.zeros(n), f"<cache-size {seed}>")


CACHE_SIZE_CASES = {  # name: (image options, cache-size)
    "preallocated, below full coverage (4k slices)": (ImageOptions(preallocation="metadata"), 384 * K),
    "preallocated, above full coverage": (ImageOptions(preallocation="metadata"), M),
    "preallocated, all to the refcount cache": (ImageOptions(preallocation="metadata"), 128 * K),
    "empty, below full coverage": (ImageOptions(), 300 * K),
    "empty, extended_l2, above": (ImageOptions(extended_l2=True), 2 * M),
}
COMPARED = ("l2_lookups", "l2_misses", "l2_disk_reads", "l2_evictions", "l2_writebacks", "l2_writebacks_at_close",
            "image_file_bytes", "refcount_lookups", "refcount_misses", "refcount_disk_reads", "refcount_evictions",
            "refcount_writebacks", "refcount_writebacks_at_close")


@pytest.mark.qemu
def test_cache_size_alone_matches_qemu(qemu_img):
    from concurrent.futures import ThreadPoolExecutor

    from qsim.image import record_file_at_open
    from qsim.qemusystem import replay_timed
    from qsim.replay import load_image, replay
    from test_cleaning import _qemu_systems

    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    jobs = [(binary, name, n) for binary in _qemu_systems() for n, name in enumerate(CACHE_SIZE_CASES)]

    def run(job):
        """qemu-system's counts, and qsim's row for the file it opens (its st_blocks: the preallocation scan)."""
        binary, name, n = job
        options, cache_size = CACHE_SIZE_CASES[name]
        scenario = Scenario(ImageSpec(options, 2 * G), (CacheSettings(cache_size=cache_size),),
                            cache_clean_interval=0)
        rows = []

        def model(path):
            loaded = load_image(scenario.image)
            record_file_at_open(loaded.state.alloc_state, path, options.cluster_size)
            rows.append(replay(_trace(n), scenario, loaded=loaded).rows[0])

        timed = replay_timed(binary, _trace(n), 2 * G, options, cache_clean_interval=0, accel=accel,
                             cache_size=cache_size, before_run=model)
        return rows[0], timed

    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = list(pool.map(run, jobs))
    for (binary, name, n), (ours, timed) in zip(jobs, runs):
        assert {k: ours[k] for k in COMPARED} == {k: timed.counts[k] for k in COMPARED}, (binary, name)


@pytest.mark.qemu
def test_validate_takes_cache_size(qemu_img):
    """qsim validate with cache-size goes through qemu-system's drive (qemu-io's -t cannot take it), cleaning off."""
    from qsim.validate import COMPARED as VALIDATED, WHEN_MODELLED, validate
    from test_cleaning import _qemu_systems

    _qemu_systems()
    scenario = Scenario(ImageSpec(ImageOptions(preallocation="metadata"), 2 * G), (CacheSettings(cache_size=384 * K),))
    v = validate(_trace(7), scenario)
    assert "qemu-system" in v.qemu_version
    assert v.qsim["l2_cache_entries"] == 32 and v.qsim["l2_misses"] > 100
    assert set(WHEN_MODELLED) <= set(v.compared)
    assert {k: v.qsim[k] for k in VALIDATED + WHEN_MODELLED} == {k: v.qemu[k] for k in VALIDATED + WHEN_MODELLED}
