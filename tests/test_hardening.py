"""No surprises: every subcommand meets wrong, missing and absurd input with one clear line and a sensible exit
status; property tests for the trace formats and for cache sizing."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsim.cachecfg import CacheSettings, resolve_cache
from qsim.geometry import ImageGeometry
from qsim.trace import DISCARD, FLUSH, READ, WRITE, Trace
from qsim.traceio import read_trace, write_trace

ROOT = Path(__file__).resolve().parent.parent
TRACE = str(ROOT / "traces" / "synth-hotspot-mixed.csv")


@pytest.fixture(scope="module")
def junk(tmp_path_factory):
    d = tmp_path_factory.mktemp("junk")
    (d / "empty").write_bytes(b"")
    (d / "garbage").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    return d


CASES = [
    (["size", "-1"], 2), (["size", "9E"], 2), (["size", str(2**70)], 2), (["size", "1T", "--l2-cache-size", "x"], 2),
    (["size", "1T", "--cache-size", "1k", "--l2-cache-size", "2k", "--refcount-cache-size", "1k"], 1),
    (["measure"], 2), (["measure", "1T", "-o", "cluster_size=0"], 1), (["measure", "1T", "-o", "refcount_bits=x"], 2),
    (["trace", "info", "{empty}"], 1), (["trace", "info", "{garbage}"], 1), (["trace", "info", "{dir}"], 1),
    (["trace", "info", "/no/such/file"], 1), (["trace", "synth", "x.npz", "--size", "0", "--requests", "5"], 2),
    (["trace", "synth", "x.npz", "--size", "1G", "--requests", "5", "--rw", "150"], 2),
    (["trace", "convert", "{garbage}", "x.csv"], 1), (["trace", "convert", TRACE, "/no/such/dir/x.csv"], 1),
    (["replay", "{empty}"], 1), (["replay", "{garbage}"], 1), (["replay", "{dir}"], 1),
    (["replay", TRACE, "--size", "0"], 1), (["replay", TRACE, "--size", "9E"], 2),
    (["replay", TRACE, "--l2-cache-size", "0..0"], 2), (["replay", TRACE, "--cache-mode", "sometimes"], 2),
    (["replay", TRACE, "--image", "{garbage}"], 1), (["replay", TRACE, "--image", "{empty}"], 1),
    (["sweep", TRACE, "--cluster-size", "0"], 1), (["sweep", TRACE, "--cluster-size", "3k"], 1),
    (["inspect", "{garbage}"], 1), (["inspect", "{empty}"], 1), (["inspect", "{dir}"], 1),
    (["inspect", "/no/such/image"], 1), (["plot", "mrc", "--save", "x.png"], 2),
    (["plot", "mrc", TRACE, "--save", "x.png"], 1), (["plot", "coverage", "--save", "x.pdf"], 2),
    (["validate", "/no/such/file"], None),
]


@pytest.mark.parametrize("argv, status", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_and_a_sensible_status(junk, tmp_path, argv, status):
    argv = [a.format(empty=junk / "empty", garbage=junk / "garbage", dir=junk) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert proc.returncode in ((1, 2) if status is None else (status,)), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr


def test_version_and_every_help_has_an_example():
    out = subprocess.run([sys.executable, "-m", "qsim", "--version"], capture_output=True, text=True).stdout
    assert out.startswith("qsim ")
    for command in ("size", "measure", "inspect", "trace", "replay", "sweep", "validate", "plot"):
        text = subprocess.run([sys.executable, "-m", "qsim", command, "--help"], capture_output=True, text=True).stdout
        assert "examples:" in text and f"qsim {command}" in text, command


traces = st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([READ, WRITE, DISCARD, FLUSH]), min_size=n, max_size=n),
    st.lists(st.integers(0, 2**45), min_size=n, max_size=n),
    st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n)))


@settings(max_examples=40, deadline=None)
@given(traces, st.sampled_from([".iolog", ".iolog.gz", ".csv", ".npz"]))
def test_writers_and_readers_round_trip(tmp_path_factory, columns, suffix):
    op, offset, length = (np.asarray(c) for c in columns)
    flush = op == FLUSH
    t = Trace.from_arrays(op, np.where(flush, 0, offset), np.where(flush, 0, length))
    path = str(tmp_path_factory.mktemp("rt") / f"t{suffix}")
    write_trace(t, path)
    back = read_trace(path)
    assert back.op.tolist() == t.op.tolist()
    assert back.offset.tolist() == t.offset.tolist() and back.length.tolist() == t.length.tolist()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**44), st.sampled_from([512, 4096, 65536, 2 << 20]), st.booleans(),
       st.integers(0, 2**30), st.integers(0, 2**30))
def test_more_cache_never_covers_less(size, cluster, ext, a, b):
    if ext and cluster < 16384:
        ext = False
    g = ImageGeometry(size, cluster, ext)
    small, large = sorted((a, b))
    c_small = resolve_cache(g, CacheSettings(l2_cache_size=small))
    c_large = resolve_cache(g, CacheSettings(l2_cache_size=large))
    assert c_large.covered_bytes >= c_small.covered_bytes
    assert c_small.l2_cache_entries >= 2


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**44), st.sampled_from([4096, 65536, 2 << 20]), st.booleans())
def test_boundaries_exact_fit_and_one_byte_less(size, cluster, ext):
    g = ImageGeometry(size, cluster, ext and cluster >= 16384)
    full = g.full_l2_cache_bytes
    exact = resolve_cache(g, CacheSettings(l2_cache_size=full))
    assert exact.covers_disk and exact.l2_cache_entry_size == cluster
    assert resolve_cache(g, CacheSettings(l2_cache_size=full + 1)).l2_cache_bytes == full
    less = resolve_cache(g, CacheSettings(l2_cache_size=full - 1))
    assert less.l2_cache_entry_size == min(cluster, 4096)
    assert less.l2_cache_entries == max((full - 1) // less.l2_cache_entry_size, 2)


@pytest.mark.qemu
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_during_validate_stops_cleanly_and_removes_scratch_files(tmp_path, qemu_io, qemu_img,
                                                                                   signame):
    import os
    import signal
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "qsim", "validate",
                             str(ROOT / "traces" / "fio-randwrite-4k.iolog.gz"), "--cache-mode", "writethrough"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not list(tmp_path.glob("qsim-validate-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # wait until qemu-io is running in its scratch folder
    assert list(tmp_path.glob("qsim-validate-*")), "validate never started QEMU"
    time.sleep(0.3)
    proc.send_signal(getattr(signal, signame))  # SIGTERM is handled like Ctrl-C: scratch files go, one line
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "qsim validate: interrupted" and "Traceback" not in err
    assert not list(tmp_path.glob("qsim-validate-*"))

