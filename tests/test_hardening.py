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


ABSURD = [
    (["replay", TRACE, "-o", "fill=0.5,seed=-1"], "qsim replay: error: -o seed=-1: expected a whole number from 0"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "10", "--seed", "-1"],
     "qsim trace synth: error: argument --seed: -1 is out of range (expected at least 0)"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "nan"],
     "qsim trace synth: error: --requests 'nan': expected a count such as 1000, 250k or 1M"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "inf"],
     "qsim trace synth: error: --requests 'inf': expected a count such as 1000, 250k or 1M"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "1e30"],
     "qsim trace synth: error: --requests 1e30: at most 100,000,000 requests (qsim makes the trace in memory); "
     "for more, write several traces"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "1e9"],
     "qsim trace synth: error: --requests 1e9: at most 100,000,000 requests (qsim makes the trace in memory); "
     "for more, write several traces"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "10", "--bs", "4k/50:64k/50:1M/-10"],
     "qsim trace synth: error: --bs 4k/50:64k/50:1M/-10: weight -10 is negative (bssplit: 4k/50:64k/50)"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "10", "--bs", "4k/inf:64k/1"],
     "qsim trace synth: error: --bs 4k/inf:64k/1: weight 'inf' is not a number (bssplit: 4k/50:64k/50)"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "10", "--fsync", "-1"],
     "qsim trace synth: error: argument --fsync: -1 is out of range (expected at least 0)"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "10", "--rw", "nan"],
     "qsim trace synth: error: argument --rw: 'nan' is not a number"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "10", "--pattern", "zipf:nan"],
     "qsim trace synth: error: --pattern zipf:nan: zipf takes a number, e.g. zipf:1.2"),
    (["trace", "synth", "x.csv", "--size", "1G", "--requests", "10", "--pattern", "hotspot:٩٠/10"],
     "qsim trace synth: error: --pattern hotspot:٩٠/10: hotspot takes IO%/DISK%, e.g. hotspot:90/10"),
    (["plot", "coverage", "--cluster-sizes", "3k", "--save", "c.png"],
     "qsim plot: error: --cluster-sizes: 3k is not a qcow2 cluster size (a power of two from 512 to 2M)"),
    (["size", "١٠"], "qsim size: error: argument SIZE: SIZE: '١٠' is not a size (expected a number of bytes with an "
                     "optional suffix k, M, G, T, P or E, as in 512, 64k, 1.5G, 4T)"),
    (["size", "1T", "--coverage", "50%", "--l2-cache-size", "8M"],
     "qsim size: error: --coverage and --l2-cache-size both choose the L2 cache size; give one of them"),
    (["size", "1T", "--coverage", "50%", "--cache-size", "8M"],
     "qsim size: error: --coverage and --cache-size both choose the L2 cache size; give one of them"),
    (["replay", TRACE, "--save", "x.png"],
     "qsim replay: error: --save x.png: unknown suffix for a table (use .csv, .json or .parquet)"),
]


@pytest.mark.parametrize("argv, message", ABSURD, ids=[" ".join(a)[:50] for a, _ in ABSURD])
def test_absurd_arguments_are_one_exact_line(tmp_path, monkeypatch, capsys, argv, message):
    from qsim.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse
        status = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1] == message, err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("text", ["١٠", "１０", "1_0", "٣k", "1.٥G", "0x１", "1" * 200])
def test_sizes_take_ascii_digits_only(text):
    from qsim.errors import UsageError
    from qsim.units import parse_size

    with pytest.raises(UsageError, match="is not a size"):
        parse_size(text)


def test_whole_numbers_and_numbers_are_ascii_and_finite():
    from qsim.errors import UsageError
    from qsim.units import parse_number, parse_whole

    assert parse_whole(" 12 ", "--x") == 12 and parse_number("1e3", "--x") == 1000.0
    for text in ("١٠", "1_0", "1.0", "", "-"):
        with pytest.raises(UsageError, match="is not a whole number"):
            parse_whole(text, "--x")
    for text in ("nan", "inf", "-inf", "1e400", "١", "1_0", "0x10"):
        with pytest.raises(UsageError, match="is not a number"):
            parse_number(text, "--x")
