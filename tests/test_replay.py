"""The replay engine on QEMU 7.2's observed test vectors (shared/qemu-behaviour.md), a vectorized reference for
reads, the compiled kernel against its plain-Python self, and the replay/sweep interfaces."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsim.cli.scenario_args import parse_cache_sizes
from qsim.errors import UsageError
from qsim.imageopts import ImageOptions
from qsim.replay import replay
from qsim.scenario import Grid, Scenario
from qsim.sweep import sweep
from qsim.trace import DISCARD, READ, WRITE, Trace, trace_stats
from qsim.traceio import read_trace

K, M, G = 1 << 10, 1 << 20, 1 << 30
PREALLOC = ImageOptions(preallocation="metadata")
FRESH = ImageOptions()
TRACES = Path(__file__).resolve().parent.parent / "traces"


def row(trace, size, options, l2=None, entry=None, mode="writeback"):
    return replay(trace, Scenario.of((l2,), entry, options, size, cache_mode=mode)).rows[0]


def scenario(size, options, sizes):
    return Scenario.of(parse_cache_sizes(sizes), None, options, size)


def reads(offsets, length=4096):
    return Trace.from_arrays([READ] * len(offsets), offsets, [length] * len(offsets))


def counters(r, *names):
    return tuple(r[n] for n in names)


CYCLE_3_TABLES = reads([0, 512 * M, G] * 10)


@pytest.mark.parametrize(
    "trace, size, options, l2, entry, expected",
    [
        (CYCLE_3_TABLES, 2 * G, PREALLOC, 128 * K, 64 * K, (30, 30, 30, 28)),
        (CYCLE_3_TABLES, 2 * G, PREALLOC, 256 * K, 64 * K, (30, 3, 3, 0)),
        (CYCLE_3_TABLES, 2 * G, PREALLOC, None, None, (30, 3, 3, 0)),
        (reads([0, 32 * M, 64 * M] * 10), G, PREALLOC, 8 * K, None, (30, 30, 30, 28)),
        (reads([0, 32 * M, 64 * M] * 10), G, PREALLOC, 12 * K, None, (30, 3, 3, 0)),
        (reads([0, 32 * M, 64 * M] * 10), G, PREALLOC, 128 * K, None, (30, 1, 1, 0)),
        (CYCLE_3_TABLES, 2 * G, PREALLOC, 512, None, (30, 30, 30, 28)),
        (CYCLE_3_TABLES, 2 * G, PREALLOC, 0, None, (30, 30, 30, 28)),
        (CYCLE_3_TABLES, 2 * G, FRESH, None, None, (0, 0, 0, 0)),
        (reads([0, 256 * M, 512 * M] * 10), 2 * G, ImageOptions(preallocation="metadata", extended_l2=True),
         128 * K, 64 * K, (30, 30, 30, 28)),
        (reads([0, 256 * M, 512 * M] * 10), 2 * G, PREALLOC, 128 * K, 64 * K, (30, 2, 2, 0)),
        (reads([2 * M - 64 * K], 128 * K), 2 * G, PREALLOC, 8 * K, None, (1, 1, 1, 0)),
        (reads([512 * M - 64 * K], 128 * K), 2 * G, PREALLOC, 8 * K, None, (2, 2, 2, 0)),
        (reads([64 * K - 4 * K], 8 * K), 2 * G, PREALLOC, None, None, (1, 1, 1, 0)),
    ],
)
def test_qemu_7_2_read_vectors(trace, size, options, l2, entry, expected):
    r = row(trace, size, options, l2, entry)
    assert counters(r, "l2_lookups", "l2_misses", "l2_disk_reads", "l2_evictions") == expected


def test_1t_default_cache_holds_8192_slices_not_8193():
    stride = 32 * M  # one 4 KiB slice of 64 KiB-cluster L2 entries maps 32 MiB
    for distinct, second_pass_misses in ((8192, 0), (8193, 8193)):
        offsets = np.arange(distinct) * stride
        r = row(reads(np.concatenate([offsets, offsets])), 1 << 40, PREALLOC)
        assert r["l2_cache_entries"] == 8192
        assert r["l2_misses"] - distinct == second_pass_misses


def test_write_vectors():
    first = row(Trace.from_arrays([WRITE], [0], [64 * K]), 2 * G, FRESH)
    assert counters(first, "l2_lookups", "l2_misses", "l2_disk_reads", "l2_tables_allocated") == (4, 1, 0, 1)
    slices = row(Trace.from_arrays([WRITE], [0], [64 * K]), 2 * G, FRESH, 8 * K)
    assert counters(slices, "l2_lookups", "l2_misses") == (19, 17)  # 16 get_empty + copied (miss) + alloc + link
    # alloc 64K in a new table / overwrite 4K / alloc 4K cluster-aligned / alloc 64K: 4 / 1 / 4 / 3 lookups
    steps = [(M, 64 * K), (M + 8 * K, 4 * K), (3 * M, 4 * K), (5 * M, 64 * K)]
    for options, expected in ((FRESH, [4, 1, 4, 3]), (ImageOptions(extended_l2=True), [4, 1, 3, 3])):
        done = 0
        for k in range(len(steps)):
            t = Trace.from_arrays([WRITE] * (k + 1), [o for o, _ in steps[: k + 1]], [n for _, n in steps[: k + 1]])
            total = row(t, 2 * G, options)["l2_lookups"]
            assert total - done == expected[k], (options, k)
            done = total


def test_writeback_vs_writethrough():
    t = Trace.from_arrays([WRITE] * 3, [0, 64 * K, 128 * K], [4 * K] * 3)
    wb = row(t, 2 * G, FRESH)
    wt = row(t, 2 * G, FRESH, mode="writethrough")
    # the first write's new table is flushed by l2_allocate in both modes; after that, 0 vs 3 write-backs
    assert (wb["l2_writebacks"], wb["l2_writebacks_at_close"]) == (1, 1)
    assert (wt["l2_writebacks"], wt["l2_writebacks_at_close"]) == (4, 0)


def test_extended_l2_subcluster_rules():
    ext = ImageOptions(preallocation="metadata", extended_l2=True)
    mid = Trace.from_arrays([WRITE, WRITE], [64 * K + 512, 64 * K + 512], [512, 512])
    lookups = row(mid.select([0]), G, ext)["l2_lookups"], row(mid, G, ext)["l2_lookups"]
    assert (lookups[0], lookups[1] - lookups[0]) == (4, 1)  # copied, 2 zero-checks, link; then 1
    end_mid = Trace.from_arrays([WRITE, WRITE], [128 * K, 128 * K], [3 * K, 3 * K])
    lookups = row(end_mid.select([0]), G, ext)["l2_lookups"], row(end_mid, G, ext)["l2_lookups"]
    assert (lookups[0], lookups[1] - lookups[0]) == (3, 1)


def read_lookups_reference(trace, cluster_size, entry_size, table_bytes):
    """Reads on a metadata-preallocated image: one lookup per slice a request touches (tables are host-contiguous
    inside and broken between, and table ends are slice ends). Plain numpy, no QEMU model."""
    slice_bytes = entry_size // 8 * cluster_size
    first = trace.offset // slice_bytes
    last = (trace.end - 1) // slice_bytes
    return int((last - first + 1).sum())


@pytest.mark.parametrize("cluster_size, l2", [(64 * K, None), (64 * K, 16 * K), (2 * M, None), (4 * K, 8 * K)])
def test_prealloc_reads_match_the_vectorized_reference(cluster_size, l2):
    rng = np.random.default_rng(cluster_size)
    size = 8 * G
    offsets = rng.integers(0, size - M, 3000)
    lengths = rng.choice([512, 4 * K, 64 * K, 512 * K], 3000)
    t = Trace.from_arrays(np.full(3000, READ), offsets, lengths)
    r = row(t, size, ImageOptions(cluster_size=cluster_size, preallocation="metadata"), l2)
    assert r["l2_lookups"] == read_lookups_reference(t, cluster_size, r["l2_cache_entry_size"], cluster_size ** 2 // 8)


SCRIPT = """
import json, sys
import numpy as np
from qsim.imageopts import ImageOptions
from qsim.engine import run_kernel
from qsim.geometry import ImageGeometry
from qsim.image import build_image
from qsim.synth import synthesize
t = synthesize(1 << 30, 400, "uniform", "512/20:4k/50:64k/20:256k/10", read_share=0.5, flush_every=9, seed=3,
               align=512)
out = {}
for ext in (False, True):
    g = ImageGeometry(1 << 30, 65536, ext)
    image = build_image(g, ImageOptions(extended_l2=ext, fill=0.05, seed=1))
    r = run_kernel(image, t, 4096).events
    out[str(ext)] = [r.key.tolist(), r.kind.tolist(), r.flush_at.tolist(), r.counters]
json.dump(out, sys.stdout)
"""


def test_compiled_kernel_equals_plain_python():
    """The numba kernel and the same code run as plain Python (NUMBA_DISABLE_JIT) give identical event streams."""
    results = []
    for jit_off in ("0", "1"):
        env = dict(os.environ, NUMBA_DISABLE_JIT=jit_off)
        proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(proc.stdout))
    assert results[0] == results[1]
    assert len(results[0]["True"][0]) > 500


def test_replay_is_independent_of_chunking(monkeypatch):
    import qsim.engine as engine

    t = read_trace(str(TRACES / "fio-randrw-mixed-fsync.iolog.gz"))
    whole = replay(t, scenario(8 * G, ImageOptions(extended_l2=True), "16k,1M,default")).rows
    monkeypatch.setattr(engine, "CHUNK_EVENTS", 5000)
    chunked = replay(t, scenario(8 * G, ImageOptions(extended_l2=True), "16k,1M,default")).rows
    assert whole == chunked


def test_parse_cache_sizes():
    assert parse_cache_sizes("64k,1M,default") == (64 * K, M, None)
    assert parse_cache_sizes("64k..1M") == (64 * K, 128 * K, 256 * K, 512 * K, M)
    assert parse_cache_sizes("64k..768k") == (64 * K, 128 * K, 256 * K, 512 * K, 768 * K)
    assert parse_cache_sizes("64k..1M:3") == (64 * K, 256 * K, M)
    assert parse_cache_sizes(None) == (None,)
    assert parse_cache_sizes("64k,64k,default") == (64 * K, None)
    assert len(parse_cache_sizes("512..64M")) == 18
    for absurd in ("64k..64M:1000000000", "512..64M:100000000", "64k..64M:1", "64k..64M:x", "1M..64k", "0..1M"):
        with pytest.raises(UsageError):
            parse_cache_sizes(absurd)


def test_sweep_frame():
    t = read_trace(str(TRACES / "fio-randwrite-4k.iolog.gz"))
    grid = Grid(Scenario.of(parse_cache_sizes("64k,default")), (16 * K, 64 * K, 2 * M), (False, True))
    frame = sweep(t, grid, show_progress=False)
    assert len(frame) == 3 * 2 * 2
    assert set(frame["cluster_size"]) == {16 * K, 64 * K, 2 * M}
    # 4 KiB random writes into an empty image zero-fill the rest of each new cluster, or with extended_l2 only of
    # each newly touched 64 KiB subcluster of a 2 MiB cluster
    off = frame[(frame.cluster_size == 2 * M) & ~frame.extended_l2].iloc[0]
    on = frame[(frame.cluster_size == 2 * M) & frame.extended_l2].iloc[0]
    assert off["zero_fill_bytes"] == off["clusters_allocated"] * 2 * M
    assert on["zero_fill_bytes"] == trace_stats(t)["footprint_64k_clusters"] * 64 * K
    assert (frame["guest_write_bytes"] == 20000 * 4096).all()


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True)


def test_cli_replay_json_contract():
    proc = cli("replay", str(TRACES / "fio-randread-4k.iolog.gz"), "-o", "preallocation=metadata",
               "--l2-cache-size", "64k,default", "--output=json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    keys = {"cluster_size", "extended_l2", "preallocation", "l2_cache_bytes", "l2_cache_entry_size",
            "l2_cache_entries", "requests", "l2_lookups", "l2_hits", "l2_misses", "l2_disk_reads", "l2_evictions",
            "l2_writebacks", "metadata_read_bytes", "metadata_write_bytes", "cow_read_bytes", "cow_write_bytes",
            "zero_fill_bytes", "guest_read_bytes", "guest_write_bytes", "l2_tables_allocated",
            "clusters_allocated", "image_file_bytes"}
    assert len(rows) == 2 and keys <= set(rows[0])
    assert rows[1]["l2_cache_bytes"] == 4 * M and rows[1]["l2_misses"] == 64  # 32G disk: whole-disk default cache
    assert rows[0]["l2_lookups"] == 20000 and rows[0]["requests"] == 20000


def test_cli_sweep_saves_csv(tmp_path):
    out = tmp_path / "sweep.csv"
    proc = cli("sweep", str(TRACES / "synth-hotspot-mixed.csv"), "--cluster-size", "64k,128k", "--extended-l2",
               "on,off", "--l2-cache-size", "64k..256k", "--save", str(out), "--output=csv")
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    frame = pd.read_csv(out)
    assert len(frame) == 2 * 2 * 3
    assert proc.stdout.splitlines()[0].startswith("trace,virtual_size,cluster_size")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["replay", "/nonexistent"], "no such file"),
        (["replay", str(TRACES / "synth-hotspot-mixed.csv"), "--size", "1G"], "ends beyond the disk size"),
        (["replay", str(TRACES / "synth-hotspot-mixed.csv"), "--l2-cache-size", "1M..64k"], "a range goes"),
        (["replay", str(TRACES / "synth-hotspot-mixed.csv"), "-o", "cluster_size=8k,extended_l2=on"], "16384"),
        (["sweep", str(TRACES / "synth-hotspot-mixed.csv"), "--extended-l2", "maybe"], "expected on, off"),
        (["replay", str(TRACES / "synth-hotspot-mixed.csv"), "--save", "x.xlsx"], "unknown suffix"),
    ],
)
def test_cli_replay_errors(argv, message):
    proc = cli(*argv)
    assert proc.returncode in (1, 2) and message in proc.stderr and "Traceback" not in proc.stderr


def test_streaming_from_a_file_equals_the_whole_trace(tmp_path):
    """A trace replayed from disk in small chunks gives exactly the rows of the in-memory replay."""
    from qsim.synth import synthesize
    from qsim.traceio import iter_trace, write_trace

    t = synthesize(8 * G, 30_000, "zipf:1.1", "4k/60:64k/30:1M/10", read_share=0.6, flush_every=50, seed=11,
                   align=512)
    path = str(tmp_path / "t.iolog")
    write_trace(t, path)
    for options, sizes in ((ImageOptions(), "16k,1M,default"), (ImageOptions(extended_l2=True), "8k..2M"),
                           (ImageOptions(preallocation="metadata"), "64k")):
        whole = replay(read_trace(path), scenario(8 * G, options, sizes)).rows
        streamed = replay(iter_trace(path, chunk_requests=4321), scenario(8 * G, options, sizes)).rows
        assert streamed == whole


def _requests_around_data(state, n, seed):
    """Reads, writes and flushes of 512 B..192 KiB, half of them starting in clusters that hold data."""
    g = state.geometry
    rng = np.random.default_rng(seed)
    l1 = np.flatnonzero(state.table_slot >= 0)
    slots = state.table_slot[l1]
    used = state.entry_matrices()[0][slots] != 0
    rows, idx = np.nonzero(used)
    clusters = l1[rows] * g.l2_entries_per_table + idx
    starts = rng.integers(0, g.virtual_size // 512 - 512, n) * 512
    if len(clusters):
        near = rng.random(n) < 0.5
        starts[near] = clusters[rng.integers(0, len(clusters), near.sum())] * g.cluster_size + \
            rng.integers(0, g.cluster_size // 512, near.sum()) * 512
    lengths = rng.choice([512, 4 * K, 32 * K, 64 * K, 192 * K], n)
    lengths = np.minimum(lengths, g.virtual_size - starts)
    ops = rng.choice([READ, WRITE, WRITE, 3], n, p=[0.4, 0.25, 0.25, 0.1])
    return Trace.from_arrays(ops, starts, lengths)


@pytest.mark.parametrize("image", ["fresh-64k", "fresh-ext-128k", "fill-64k", "fill-64k-zeroed", "fill-ext-128k",
                                   "prealloc-ext-64k", "small-64k.qcow2", "small-ext-128k.qcow2",
                                   "small-compressed.qcow2"])
@pytest.mark.parametrize("writethrough", [False, True])
def test_fast_paths_equal_the_general_code(image, writethrough):
    """The kernel's shortcuts (one-extent reads, in-place overwrites) change nothing: the same events, flushes,
    counters and image afterwards as QEMU's general code paths."""
    import qsim.engine as engine
    from qsim.geometry import ImageGeometry
    from qsim.image import build_image, image_from_qcow2
    from qsim.qcow2 import open_image

    if image.endswith(".qcow2"):
        state = image_from_qcow2(open_image(str(Path(__file__).parent / "fixtures" / image)))
    else:
        cluster = 128 * K if "128k" in image else 64 * K
        options = ImageOptions(cluster_size=cluster, extended_l2="ext" in image,
                               preallocation="metadata" if "prealloc" in image else "off",
                               fill=0.3 if "fill" in image else 0.0, seed=7)
        state = build_image(ImageGeometry(G, cluster, options.extended_l2), options)
        if "zeroed" in image:  # every third data cluster zeroed in place (host kept: QCOW_OFLAG_ZERO | COPIED)
            from qsim.codes import F_ZERO
            assert state.dense_tables == state.n_tables  # a built image's tables have dense rows
            state.entry_flags[:, ::3] |= np.where(state.entry_host[:, ::3] != 0, F_ZERO, 0).astype(np.uint8)
    trace = _requests_around_data(state, 4000, seed=len(image))
    runs = []
    for fast in (True, False):
        r = engine.run_kernel(state, trace, 4096, writethrough=writethrough, fast_paths=fast)
        runs.append((r.events.key.tolist(), r.events.kind.tolist(), r.events.flush_at.tolist(), r.events.counters,
                     [a.tolist() for a in r.image.entry_matrices() if a is not None]))
    assert runs[0] == runs[1]
    assert runs[0][3]["writes"] > 1000 and len(runs[0][0]) > 3000


@pytest.mark.parametrize("case", ["reads", "reads crossing slices", "with writes", "extended_l2 reads"])
def test_coarser_slices_share_the_finest_stage_1(case):
    """Cache sizes that get different slice (entry) sizes -- 4k slices while the cache covers part of the disk,
    whole tables once it covers all of it -- run stage 1 once when the coarser streams are the finest one with
    shifted keys. The rows must equal separate runs, and the rule must refuse what does not nest."""
    from qsim.engine import events_nest
    from qsim.geometry import ImageGeometry
    from qsim.image import build_image

    rng = np.random.default_rng(5)
    n = 3000
    ext = case.startswith("extended")
    cluster = 128 * K if ext else 64 * K
    slice_bytes = 4 * K // (16 if ext else 8) * cluster
    offsets = rng.integers(0, 8 * G // (4 * K) - 64, n) * 4 * K
    lengths = rng.choice([4 * K, 16 * K, 64 * K, 256 * K], n)
    if case != "reads crossing slices":  # every read inside one 4k-entry slice
        offsets = np.minimum(offsets, (offsets // slice_bytes + 1) * slice_bytes - lengths)
    ops = rng.choice([READ, READ, READ, 3], n)
    if case == "with writes":
        ops[::7] = WRITE
    t = Trace.from_arrays(ops, offsets, lengths)
    options = ImageOptions(cluster_size=cluster, extended_l2=ext, fill=0.2, seed=3)
    rows = {}
    for share in (True, False):
        rows[share] = replay(t, scenario(8 * G, options, "4k,64k,1M,default"), share_stage_1=share).rows
        if case == "with writes":  # streamed: writes first, then a read-only chunk that would nest on its own
            reads = t.select(t.op != WRITE)
            rows[share] += replay([t.select(np.arange(n // 2)), reads], scenario(8 * G, options, "4k,64k,1M,default"),
                                  share_stage_1=share).rows
    assert rows[True] == rows[False]
    assert [r["l2_cache_entry_size"] for r in rows[True][:4]] == [4 * K, 4 * K, cluster, cluster]
    state = build_image(ImageGeometry(8 * G, cluster, ext), options)
    assert events_nest(t, state, 4 * K) == (case in ("reads", "extended_l2 reads"))


def test_memory_follows_the_data_not_the_disk():
    """A small trace on a 1 EiB disk (2M clusters: 2^30 addressable 4k slices) costs what it costs on a small disk;
    stage 2 used to size itself by every slice the L1 table could address (23 GB, killed)."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child of a large pytest process would report
    # the parent's size at fork; VmHWM belongs to the child's own address space.
    code = ("from qsim.replay import replay\nfrom qsim.scenario import Scenario\n"
            "from qsim.imageopts import ImageOptions\nfrom qsim.synth import synthesize\n"
            "t = synthesize(1 << 44, 20000, 'uniform', '4k', read_share=0.7, seed=1)\n"
            "rows = replay(t, Scenario.of((None, 1 << 20), None, ImageOptions(cluster_size=2 << 20), 1 << 60)).rows\n"
            "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]\n"
            "print(int(hwm) >> 10, rows[1]['l2_misses'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    peak_mib, misses = int(out[0]), int(out[1])
    assert peak_mib < 600, f"peak RSS {peak_mib} MiB"
    assert misses > 10_000  # the writes' tables are real: most 4k reads and writes miss a 1M cache of 4k slices


def test_cli_replay_without_size_reads_the_trace_once_and_equals_size_given(tmp_path, monkeypatch, capsys):
    """Without --size (synthetic image), the one pass that finds the trace's end keeps the chunks for the replay;
    the rows equal those of --size given, and of the two-pass fallback for a trace larger than the memory budget."""
    from qsim.cli import main
    from qsim.synth import synthesize
    from qsim.traceio import textfile, write_trace
    from qsim.traceio.reading import ReadOptions

    path = str(tmp_path / "t.iolog")
    t = synthesize(5 * G, 20_000, "zipf:1.1", "4k/70:64k/30", read_share=0.7, flush_every=40, seed=3)
    write_trace(t, path)
    assert 4 * G < t.max_end_offset <= 5 * G
    passes = []
    real_chunks = ReadOptions.chunks
    monkeypatch.setattr(ReadOptions, "chunks", lambda self, p, **kw: passes.append(p) or real_chunks(self, p, **kw))

    def rows(*extra):
        passes.clear()
        assert main(["replay", path, "-o", "preallocation=metadata", "--l2-cache-size", "64k,1M,default",
                     "--output", "json", *extra]) == 0
        return json.loads(capsys.readouterr().out), len(passes)

    once, reads = rows()
    assert reads == 1 and once[0]["virtual_size"] == 5 * G and once[0]["requests"] == len(t)
    given, reads = rows("--size", "5G")
    assert reads == 1 and given == once
    monkeypatch.setattr(textfile, "available_memory", lambda: 1000)  # too little to hold it: read it twice
    twice, reads = rows()
    assert reads == 2 and twice == once


@pytest.mark.parametrize("case", ["reads", "writes-timed", "comma,name"])
def test_cli_rows_written_without_pandas_equal_pandas_output(tmp_path, case, capsys):
    """``qsim replay --output csv|json`` writes plain rows itself (no pandas import at start-up): byte for byte what
    pandas' to_csv and to_dict wrote."""
    import argparse
    import io

    from qsim.cli.common import print_json
    from qsim.cli.replay import emit_rows, plain_rows
    from qsim.synth import synthesize

    t = synthesize(4 * G, 3000, "zipf:1.1", "4k/70:64k/30", read_share=1.0 if case == "reads" else 0.6,
                   flush_every=0 if case == "reads" else 20, seed=9)
    if case == "writes-timed":
        t = Trace(t.op, t.offset, t.length, np.arange(len(t)) * 0.5, "timed.iolog")
    if case == "comma,name":
        t = Trace(t.op, t.offset, t.length, None, 'a,b "c".iolog')
    result = replay(t, scenario(4 * G, ImageOptions(preallocation="metadata" if case == "reads" else "off"),
                                "16k,1M,default"))
    assert plain_rows(result.rows)
    for output in ("csv", "json"):
        emit_rows(result, argparse.Namespace(save=None, output=output))
        ours = capsys.readouterr().out
        frame = result.to_frame()
        if output == "csv":
            buffer = io.StringIO()
            frame.to_csv(buffer, index=False)
            expected = buffer.getvalue()
        else:
            print_json(frame.to_dict(orient="records"))
            expected = capsys.readouterr().out
        assert ours == expected, output


@pytest.mark.parametrize("case", ["writes", "discards", "cleaning", "extended"])
def test_pipelined_stages_equal_the_serial_replay(monkeypatch, case):
    """Stage 1 a chunk ahead of stage 2 in a thread, over two alternating event buffer sets, gives the serial
    replay's rows; the chunks are small enough that each buffer set is reused hundreds of times."""
    import time

    import qsim.engine as engine
    from qsim.lru import CacheModel
    from qsim.synth import synthesize

    replay_module = sys.modules["qsim.replay"]
    monkeypatch.setattr(engine, "CHUNK_EVENTS", 4000)
    t = synthesize(256 * G, 40_000, "zipf:0.6", "4k/60:64k/30:1M/10", read_share=0.5, flush_every=50, seed=5,
                   align=512)
    fields = {}
    options = ImageOptions(extended_l2=case == "extended")
    if case == "discards":
        discards = np.random.default_rng(5).random(len(t)) < 0.2
        t = Trace.from_arrays(np.where(discards & (t.op == WRITE), DISCARD, t.op), t.offset, t.length)
        fields["discard"] = "unmap"
    if case == "cleaning":  # ticks every 60 s over 40 minutes: the stream carries them between event chunks
        t = Trace.from_arrays(t.op, t.offset, t.length, np.linspace(0.0, 2400.0, len(t)))
        fields["cache_clean_interval"] = 60
    scenario = Scenario.of(parse_cache_sizes("1M,4M,default"), 4 * K, options, 256 * G, **fields)  # (one slice size)
    monkeypatch.setattr(replay_module, "PIPELINE_MIN_REQUESTS", 1 << 60)
    serial = replay(t, scenario).rows
    monkeypatch.setattr(replay_module, "PIPELINE_MIN_REQUESTS", 0)
    feed = CacheModel.feed

    def slow_feed(self, *args):  # stage 2 lags, so stage 1 is always a chunk ahead (and would overwrite it)
        time.sleep(0.002)
        feed(self, *args)

    monkeypatch.setattr(CacheModel, "feed", slow_feed)
    streams = []
    stage_1_stream = replay_module._stage_1_stream
    monkeypatch.setattr(replay_module, "_stage_1_stream", lambda *a: streams.append(1) or stage_1_stream(*a))
    pipelined = replay(t, scenario).rows
    assert streams and pipelined == serial
    assert serial[0]["l2_misses"] > 1000 and (case != "cleaning" or serial[0]["cache_clean_ticks"] == 40)
