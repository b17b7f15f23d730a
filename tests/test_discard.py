"""Discards as QEMU does them (block/io.c bdrv_co_pdiscard, block/qcow2.c qcow2_co_pdiscard, block/qcow2-cluster.c
qcow2_cluster_discard): the model's own rules, then qsim beside real qemu-io with discard=unmap and discard=ignore
on a fresh image, a real ext4 image, extended_l2, 4k clusters and a disk that is not a whole number of clusters,
and discard-no-unref on QEMU >= 8.1, once per QEMU build (the ``qemu`` fixture)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REQUIRE_QEMU, qemu_version_of
from qsim.errors import QsimError
from qsim.imageopts import ImageOptions
from qsim.replay import replay
from qsim.scenario import ImageSpec, Scenario
from qsim.trace import DISCARD, FLUSH, READ, WRITE, Trace
from qsim.traceio import read_trace, write_trace
from qsim.validate import validate

K, M, G = 1 << 10, 1 << 20, 1 << 30


def mixed_trims(span: int, n: int = 1500, seed: int = 0, sizes=(4 * K, 64 * K, 256 * K, M),
                share=(0.35, 0.4, 0.2, 0.05), start: int = 0, one_cluster_writes: bool = False) -> Trace:
    """Reads, writes, discards (aligned and not, small and large) and flushes over [start, start + span).
    ``one_cluster_writes``: writes are 4k-aligned 4k (with 4k clusters: never split into parallel parts, which
    QEMU runs in an order of its own when a part allocates an L2 table)."""
    rng = np.random.default_rng(seed)
    ops = rng.choice([READ, WRITE, DISCARD, FLUSH], size=n, p=share)
    offsets = start + rng.integers(0, span // (4 * K), size=n) * 4 * K + rng.choice([0, 0, 0, 512], size=n)
    lengths = rng.choice(sizes, size=n)
    if one_cluster_writes:
        offsets = np.where(ops == WRITE, offsets // (4 * K) * 4 * K, offsets)
        lengths = np.where(ops == WRITE, 4 * K, lengths)
    lengths = np.minimum(lengths, start + span - offsets)
    return Trace.from_arrays(ops, offsets, np.where(ops == FLUSH, 0, lengths))


def row(trace, discard="unmap", options=ImageOptions(), size=G, **fields):
    return replay(trace, Scenario.of((None,), None, options, size, discard=discard, **fields)).rows[0]


# --- the model's rules -------------------------------------------------------------------------------------------

def test_ignore_changes_nothing_but_the_count():
    t = mixed_trims(64 * M, 400, seed=1)
    kept = t.op != DISCARD
    a, b = row(t, "ignore"), row(Trace.from_arrays(t.op[kept], t.offset[kept], t.length[kept]), "ignore")
    assert a["discards"] == int((~kept).sum()) > 0 and b["discards"] == 0
    counters = ("l2_lookups", "l2_misses", "l2_writebacks", "l2_writebacks_at_close", "image_file_bytes")
    assert {k: a[k] for k in counters} == {k: b[k] for k in counters}
    assert a["clusters_discarded"] == a["clusters_freed"] == a["discards_to_host"] == 0


def test_freed_clusters_are_reused_first_fit():
    cs = 64 * K
    t = Trace.from_arrays([WRITE, DISCARD, WRITE], [0, 0, 10 * M], [M, M, 4 * K])
    r = replay(t, Scenario.of((None,), None, ImageOptions(), G, discard="unmap"))
    assert r.rows[0]["clusters_freed"] == 16 and r.rows[0]["discards_to_host"] == 1
    assert r.rows[0]["discarded_bytes"] == M
    state = r.image_after
    slot = state.table_slot[0]
    first_data = 5  # header, refcount table, refcount block, L1, the L2 table, then data
    host, flags, _ = state.table_entries(slot)
    assert host[0] == 0 and flags[0] == 1  # zero flag, no host cluster
    assert host[10 * M // cs] == first_data  # the next write lands in the first hole
    assert r.rows[0]["image_file_bytes"] == (first_data + 16) * cs


def test_partial_clusters_are_ignored_except_the_last_one_of_the_disk():
    size = 100 * M + 20 * K  # not a whole number of 64k clusters
    last = size // (64 * K) * 64 * K
    write = Trace.from_arrays([WRITE], [last - 64 * K], [size - last + 64 * K])
    for offset, length, freed in [(last - 64 * K + 4 * K, 60 * K, 0), (last, size - last, 1),
                                  (last - 64 * K, size - last + 64 * K, 2), (last + 4 * K, size - last - 4 * K, 0),
                                  (last - 32 * K, size - last + 32 * K, 1)]:
        t = Trace.from_arrays(list(write.op) + [DISCARD], list(write.offset) + [offset],
                              list(write.length) + [length])
        assert row(t, size=size)["clusters_freed"] == freed, (offset, length)


def test_discard_no_unref_keeps_the_clusters():
    t = Trace.from_arrays([WRITE, DISCARD, WRITE], [0, 0, 10 * M], [M, M, 64 * K])
    keep = replay(t, Scenario.of((None,), None, ImageOptions(), G, discard="unmap", discard_no_unref=True,
                                 qemu_version="10.0"))
    r = keep.rows[0]
    assert r["clusters_discarded"] == 16 and r["clusters_freed"] == 0 and r["discards_to_host"] == 16
    slot = keep.image_after.table_slot[0]
    host, flags, _ = keep.image_after.table_entries(slot)
    assert host[0] == 5 and flags[0] & 1  # zero-allocated
    assert r["image_file_bytes"] > row(t)["image_file_bytes"]


def test_discard_no_unref_needs_qemu_8_1():
    with pytest.raises(QsimError, match="does not support the option 'discard-no-unref'"):
        Scenario(discard="unmap", discard_no_unref=True)  # --qemu-version 7.2, the default
    Scenario(discard="unmap", discard_no_unref=True, qemu_version="8.1")
    proc = subprocess.run([sys.executable, "-m", "qsim", "replay", str(Path(__file__).parent.parent / "traces" /
                                                                        "synth-hotspot-mixed.csv"),
                           "--discard", "unmap", "--discard-no-unref"], capture_output=True, text=True)
    assert proc.returncode == 1 and "QEMU 7.2" in proc.stderr and "Traceback" not in proc.stderr


def test_the_refcount_cache_no_longer_makes_rows_inexact():
    """After a refcount drop, an eviction from QEMU's refcount cache (4 blocks by default) flushes the L2 cache;
    qsim.refcache models that coupling, so a host file needing many refcount blocks stays exact (unless QEMU's own
    racing split writes make it vary)."""
    small = ImageOptions(cluster_size=4 * K)  # a refcount block describes 8 MiB of host file
    big = row(mixed_trims(200 * M, 600, seed=3), options=small)
    assert "refcount cache" not in big["inexact_reason"] and big["refcount_evictions"] > 0


JIT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_discard import mixed_trims
from qsim.engine import run_kernel
from qsim.image import build_image
from qsim.geometry import ImageGeometry
from qsim.imageopts import ImageOptions
import qsim.engine as engine
out = {}
for ext, no_unref in ((False, False), (True, False), (False, True)):
    state = build_image(ImageGeometry(1 << 30, 65536, ext), ImageOptions(extended_l2=ext))
    run = engine.KernelRun(state, 4096, discard="unmap", discard_no_unref=no_unref)
    events = [[c.key.tolist(), c.kind.tolist(), c.flush_at.tolist()] for c in run.feed(mixed_trims(64 << 20, 300))]
    out[f"{ext}-{no_unref}"] = [events, run.counters]
json.dump(out, sys.stdout)
"""


def test_compiled_discards_equal_plain_python():
    results = []
    for jit_off in ("0", "1"):
        env = dict(os.environ, NUMBA_DISABLE_JIT=jit_off)
        proc = subprocess.run([sys.executable, "-c", JIT_SCRIPT, str(Path(__file__).parent)], capture_output=True,
                              text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(proc.stdout))
    assert results[0] == results[1]
    assert results[0]["False-False"][1]["clusters_freed"] > 100


# --- beside real QEMU --------------------------------------------------------------------------------------------

def same(v) -> dict:
    """The counters that differ (empty when every compared counter agrees)."""
    return v.differences


def missing(message: str) -> None:
    """Skip, or fail where the QEMU comparisons are required (CI installs e2fsprogs and strace too)."""
    if REQUIRE_QEMU:
        pytest.fail(message + " but QSIM_REQUIRE_QEMU=1")
    pytest.skip(message)


@pytest.fixture(scope="session")
def fs_image(tmp_path_factory) -> str:
    """A real ext4 filesystem image: mke2fs -d fills a raw file from a folder, qemu-img convert makes it qcow2."""
    mke2fs = shutil.which("mke2fs") or "/usr/sbin/mke2fs"
    qemu_img = shutil.which("qemu-img")
    if not os.access(mke2fs, os.X_OK) or qemu_img is None:
        missing("mke2fs (e2fsprogs) and qemu-img are needed for a real filesystem image")
    d = tmp_path_factory.mktemp("fs")
    rng = np.random.default_rng(7)
    files = d / "files"
    for k in range(60):
        (files / f"dir{k % 6}").mkdir(parents=True, exist_ok=True)
        (files / f"dir{k % 6}" / f"f{k}.bin").write_bytes(rng.bytes(int(rng.integers(4 * K, 600 * K))))
    raw, image = d / "fs.raw", d / "fs.qcow2"
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-d", str(files), str(raw), "128M"], check=True,
                   capture_output=True)
    subprocess.run([qemu_img, "convert", "-q", "-O", "qcow2", str(raw), str(image)], check=True)
    return str(image)


CASES = {
    "fresh image": (mixed_trims(256 * M, seed=1), ImageOptions(), G, None),
    "extended_l2": (mixed_trims(256 * M, seed=2), ImageOptions(extended_l2=True), G, None),
    "4k clusters": (mixed_trims(20 * M, seed=3, sizes=(4 * K, 16 * K, 64 * K, 256 * K), one_cluster_writes=True),
                    ImageOptions(cluster_size=4 * K), G, 16 * K),
    "odd-size disk": (mixed_trims(4 * M, 1200, seed=4, sizes=(4 * K, 20 * K, 64 * K, 200 * K), start=96 * M + 20 * K),
                      ImageOptions(), 100 * M + 20 * K, None),
    "backing file, 4k slices": (mixed_trims(128 * M, seed=5), ImageOptions(backing=True), G, 32 * K),
}


@pytest.mark.qemu
@pytest.mark.parametrize("discard", ["unmap", "ignore"])
@pytest.mark.parametrize("name", list(CASES))
def test_trims_match_qemu(name, discard, qemu):
    trace, options, size, l2 = CASES[name]
    v = validate(trace, Scenario.of((l2,), None, options, size, discard=discard), qemu_io=qemu)
    assert same(v) == {} and v.match
    if discard == "unmap":
        assert replay(trace, Scenario.of((l2,), None, options, size, discard=discard)).rows[0]["clusters_freed"] > 0


@pytest.mark.qemu
@pytest.mark.parametrize("discard", ["unmap", "ignore"])
def test_trims_on_a_real_filesystem_image_match_qemu(discard, fs_image, qemu, tmp_path):
    """fstrim-like large trims, a guest's small writes and reads, recorded as a fio v3 iolog with trim lines."""
    rng = np.random.default_rng(11)
    n = 1500
    ops = rng.choice([READ, WRITE, DISCARD, FLUSH], size=n, p=[0.45, 0.35, 0.15, 0.05])
    big = rng.choice([M, 4 * M], size=n)
    lengths = np.where(ops == DISCARD, big, rng.choice([4 * K, 16 * K, 64 * K], size=n))
    offsets = np.minimum(rng.integers(0, 128 * M // (4 * K), size=n) * 4 * K, 128 * M - lengths)
    path = str(tmp_path / "trims.iolog")
    write_trace(Trace.from_arrays(ops, offsets, np.where(ops == FLUSH, 0, lengths)), path)
    assert " trim " in Path(path).read_text()
    trace = read_trace(path)
    v = validate(trace, Scenario(image=ImageSpec(path=fs_image), discard=discard), qemu_io=qemu)
    assert same(v) == {} and v.match


@pytest.mark.qemu
@pytest.mark.parametrize("options", [ImageOptions(), ImageOptions(extended_l2=True)], ids=["64k", "extended_l2"])
def test_discard_no_unref_matches_qemu(options, qemu, tmp_path):
    if qemu_version_of(qemu) < (8, 1):  # QEMU itself refuses the option, as qsim does for --qemu-version < 8.1
        trace = tmp_path / "trims.csv"
        trace.write_text("op,offset,length\nwrite,0,65536\ndiscard,0,65536\n")
        proc = subprocess.run([sys.executable, "-m", "qsim", "validate", str(trace), "--qemu-io", qemu,
                               "--qemu-version", "8.1", "--discard", "unmap", "--discard-no-unref"],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and "does not support the option 'discard-no-unref'" in proc.stderr, proc.stderr
        return
    trace = mixed_trims(256 * M, seed=6)
    v = validate(trace, Scenario.of((None,), None, options, G, discard="unmap", discard_no_unref=True,
                                    qemu_version="10.0"), qemu_io=qemu)
    assert same(v) == {} and v.match


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["fresh image", "extended_l2", "odd-size disk"])
def test_discards_to_host_match_qemus_punched_holes(name, qemu, tmp_path):
    """What QEMU passes down to the image file: each discard of the file is one fallocate(PUNCH_HOLE) (file-posix),
    counted with strace; with discard-no-unref (QEMU >= 8.1) cluster by cluster."""
    from qsim.qemu import commands, create_image, image_opts

    strace = shutil.which("strace")
    if strace is None:
        missing("strace is needed to count the discards QEMU passes to the image file")
    trace, options, size, l2 = CASES[name]
    for no_unref in (False, True) if qemu_version_of(qemu) >= (8, 1) else (False,):
        image, log = str(tmp_path / f"{no_unref}.qcow2"), str(tmp_path / f"{no_unref}.strace")
        create_image(image, size, options, str(tmp_path), qemu)
        subprocess.run([strace, "-f", "-e", "trace=fallocate", "-o", log, qemu, "--image-opts", "-t", "writeback",
                        image_opts(image, l2, None, "unmap", no_unref)], input=commands(trace), text=True,
                       capture_output=True, check=True)
        holes = [int(line.rsplit(",", 1)[1].strip(" )\n").split(")")[0]) for line in open(log)
                 if "FALLOC_FL_PUNCH_HOLE" in line and "= 0" in line]
        r = replay(trace, Scenario.of((l2,), None, options, size, discard="unmap", discard_no_unref=no_unref,
                                      qemu_version="10.0")).rows[0]
        assert (r["discards_to_host"], r["discarded_bytes"]) == (len(holes), sum(holes)) != (0, 0)
