"""Trace readers, writers and generators: real fio output, round trips, and every malformed input we can think of."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsim.errors import QsimError
from qsim.synth import BlockSizes, synthesize
from qsim.trace import DISCARD, FLUSH, READ, WRITE, Trace, apply_offset_policy, trace_stats
from qsim.traceio import read_trace, write_trace

TRACES = Path(__file__).resolve().parent.parent / "traces"


def write(tmp_path, name, text, compress=False):
    path = tmp_path / name
    data = text.encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


V3 = """fio version 3 iolog
27 disk.img add
192 disk.img open
199 disk.img read 4046848 4096
460 disk.img write 8192 512
470 disk.img sync 0 0
480 disk.img trim 65536 65536
490 disk.img datasync 0 0
500 disk.img close
"""


def test_iolog_v3_all_actions(tmp_path):
    t = read_trace(write(tmp_path, "a.iolog", V3))
    assert t.op.tolist() == [READ, WRITE, FLUSH, DISCARD, FLUSH]
    assert t.offset.tolist() == [4046848, 8192, 0, 65536, 0]
    assert t.length.tolist() == [4096, 512, 0, 65536, 0]
    assert t.time.tolist() == pytest.approx([199e-6, 460e-6, 470e-6, 480e-6, 490e-6])


def test_iolog_v2_gzip(tmp_path):
    text = "fio version 2 iolog\n/dev/vda add\n/dev/vda open\n/dev/vda read 0 4096\n/dev/vda wait 0 100\n" \
           "/dev/vda write 4096 8192\n/dev/vda close\n"
    t = read_trace(write(tmp_path, "b.iolog.gz", text, compress=True))
    assert t.op.tolist() == [READ, WRITE] and t.time is None
    assert t.length.tolist() == [4096, 8192]


def test_iolog_several_files(tmp_path):
    text = "fio version 2 iolog\na add\nb add\na read 0 4096\nb read 8192 4096\na write 4096 4096\n"
    path = write(tmp_path, "c.iolog", text)
    with pytest.raises(QsimError, match=r"names 2 files \(a, b\); choose one with --file"):
        read_trace(path)
    assert read_trace(path, file="a").offset.tolist() == [0, 4096]
    assert read_trace(path, file="b").offset.tolist() == [8192]
    with pytest.raises(QsimError, match="'z' is not in the log"):
        read_trace(path, file="z")


@pytest.mark.parametrize(
    "body, message",
    [
        ("1 f read 0 4096\n2 f frobnicate 0 4096\n", "line 3: unknown action 'frobnicate'"),
        ("1 f read 0 4096\n2 f read abc 4096\n", "line 3: offset 'abc' is not a whole number"),
        ("1 f read 0 0\n", "line 2: length 0 is not valid"),
        ("1 f read 0 -4096\n", "line 2: length -4096 is not valid"),
        ("1 f read -512 4096\n", "line 2: offset -512 is not a byte offset"),
        ("1 f read 0 4096 77\n", "line 2: expected TIME FILE ACTION [OFFSET LENGTH], found 6 fields"),
        ("1 f read 0\n", "line 2: read needs an offset and a length"),
        ("1 f read 0 4096\n\n3 f read 1.5 4096\n", "line 4: offset"),
        ("x f read 0 4096\n", "line 2: timestamp 'x' is not a whole number"),
    ],
)
def test_iolog_errors_name_file_and_line(tmp_path, body, message):
    path = write(tmp_path, "bad.iolog", "fio version 3 iolog\n" + body)
    with pytest.raises(QsimError) as err:
        read_trace(path)
    assert str(err.value).startswith(path) and message in str(err.value)


def test_csv_reader_and_errors(tmp_path):
    t = read_trace(write(tmp_path, "t.csv", "op,offset,length,time\nread,0,4096,0.5\nW,4096,512,0.6\nflush,,,0.7\n"
                         "trim,0,65536,0.8\n"))
    assert t.op.tolist() == [READ, WRITE, FLUSH, DISCARD] and t.time.tolist() == [0.5, 0.6, 0.7, 0.8]
    for body, message in [
        ("op,offset,length\nmunch,0,4096\n", "line 2: unknown op 'munch'"),
        ("op,offset,length\nread,zero,4096\n", "line 2: offset 'zero' is not a whole number"),
        ("op,offset,length\nread,0,4096\nread,0,0\n", "line 3: length 0 is not valid"),
        ("op,offset,length\nread,-1,4096\n", "line 2: offset -1 is negative"),
        ("op,offset\nread,0\n", "missing length"),
    ]:
        with pytest.raises(QsimError, match=message):
            read_trace(write(tmp_path, "bad.csv", body))


def test_blkparse_reader(tmp_path):
    text = """  8,0    3        1     0.000000000   697  Q   W 223490 + 8 [kjournald]
  8,0    3        2     0.000001000   697  G   W 223490 + 8 [kjournald]
  8,0    1        3     0.000100000   700  Q   R 1000 + 16 [fio]
  8,0    1        4     0.000200000   700  Q  DS 2048 + 128 [fstrim]
  8,0    1        5     0.000300000   700  Q  FWS [kworker]
  8,0    1        6     0.000400000   700  C   R 1000 + 16 [0]
CPU0 (8,0):
 Reads Queued:           1,        8KiB  Writes Queued:           1,        4KiB
"""
    t = read_trace(write(tmp_path, "b.txt", text))
    assert t.op.tolist() == [WRITE, READ, DISCARD, FLUSH]
    assert t.offset.tolist() == [223490 * 512, 1000 * 512, 2048 * 512, 0]
    assert t.length.tolist() == [4096, 8192, 65536, 0]
    assert read_trace(write(tmp_path, "b.txt", text), action="C").op.tolist() == [READ]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty file"), (b"\x00\x01\x02garbage" * 100, "binary data"), (b"hello world\n", "unknown trace format")],
)
def test_unrecognisable_files(tmp_path, content, message):
    path = tmp_path / "x"
    path.write_bytes(content)
    with pytest.raises(QsimError, match=message):
        read_trace(str(path))


def test_missing_and_directory(tmp_path):
    with pytest.raises(QsimError, match="no such file"):
        read_trace(str(tmp_path / "nope.iolog"))
    with pytest.raises(QsimError, match="is a directory"):
        read_trace(str(tmp_path))


@pytest.mark.parametrize("suffix", [".iolog", ".iolog.gz", ".csv", ".npz"])
def test_writers_round_trip(tmp_path, suffix):
    t = synthesize(1 << 30, 500, "uniform", "4k/50:64k/50", read_share=0.5, flush_every=7, seed=4)
    path = str(tmp_path / f"t{suffix}")
    write_trace(t, path)
    back = read_trace(path)
    assert back.op.tolist() == t.op.tolist()
    assert back.offset.tolist() == t.offset.tolist()
    assert back.length.tolist() == t.length.tolist()


def test_bundled_fio_traces_parse():
    t = read_trace(str(TRACES / "fio-randrw-mixed-fsync.iolog.gz"))
    s = trace_stats(t)
    assert (s["reads"], s["writes"], s["flushes"], s["requests"]) == (13948, 6052, 1194, 21194)
    sizes, counts = np.unique(t.length[t.op != FLUSH], return_counts=True)
    assert dict(zip(sizes.tolist(), counts.tolist()))[4096] == 10056  # fio trims some blocks at the file end
    seq = read_trace(str(TRACES / "fio-seqwrite-64k.iolog.gz"))
    assert (seq.offset == np.arange(16384) * 65536).all()


def test_stats():
    t = Trace.from_arrays([READ, READ, WRITE, FLUSH, DISCARD], [0, 2048, 65536, 0, 131072], [4096, 4096, 8192, 0, 512])
    s = trace_stats(t)
    assert s["footprint_4k_blocks"] == 5  # [0,4k) [0,8k) -> 2 blocks, 64k+8k -> 2, 128k -> 1
    assert s["footprint_64k_clusters"] == 3
    assert s["unaligned_share"] == 0.5
    assert s["max_end_offset"] == 131072 + 512
    assert s["size_histogram"] == {512: 1, 4096: 2, 8192: 1}


def test_offset_policies():
    t = Trace.from_arrays([READ, WRITE, READ], [0, (1 << 30) - 4096, (1 << 30) + 8192], [4096, 8192, 4096],
                          source="t.iolog")
    with pytest.raises(QsimError, match=r"t.iolog: request 2 \(write at offset 1073737728, 8192 bytes\) ends beyond"):
        apply_offset_policy(t, 1 << 30)
    assert apply_offset_policy(t, 1 << 30, "skip").offset.tolist() == [0]
    wrapped = apply_offset_policy(t, 1 << 30, "wrap")
    assert wrapped.offset.tolist() == [0, (1 << 30) - 4096, 8192]
    assert wrapped.length.tolist() == [4096, 4096, 4096]


def test_synthetic_generators_are_deterministic_and_shaped():
    a = synthesize(1 << 34, 20000, "zipf:1.2", "4k", seed=9)
    b = synthesize(1 << 34, 20000, "zipf:1.2", "4k", seed=9)
    assert (a.offset == b.offset).all()
    _, counts = np.unique(a.offset, return_counts=True)
    assert counts.max() > 500  # the hottest block gets a big share under zipf 1.2
    hot = synthesize(1 << 34, 20000, "hotspot:90/10", "4k", seed=1)
    assert 0.88 < (hot.offset < (1 << 34) // 10).mean() < 0.93
    seq = synthesize(1 << 20, 20, "seq", "64k")
    assert seq.offset.tolist() == [(i % 16) * 65536 for i in range(20)]
    assert (synthesize(1 << 30, 1000, bs="4k-64k", seed=1).offset % 4096 == 0).all()
    assert BlockSizes.parse("4k/10:64k").weights == (10.0, 90.0)


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True)


def test_cli_trace_info_json():
    proc = run_cli("trace", "info", str(TRACES / "fio-randread-4k.iolog.gz"), "--output=json")
    d = json.loads(proc.stdout)
    assert (d["requests"], d["reads"], d["writes"], d["read_bytes"]) == (20000, 20000, 0, 20000 * 4096)
    assert d["max_end_offset"] <= 32 << 30


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trace", "info", "/nonexistent.iolog"], "/nonexistent.iolog: no such file"),
        (["trace", "synth", "x.iolog", "--size", "1G", "--requests", "lots"], "--requests 'lots'"),
        (["trace", "synth", "x.iolog", "--size", "1G", "--requests", "10", "--pattern", "fractal"],
         "--pattern fractal"),
        (["trace", "synth", "x.txt", "--size", "1G", "--requests", "10"], "cannot tell the format"),
    ],
)
def test_cli_trace_errors(argv, message):
    proc = run_cli(*argv)
    assert proc.returncode in (1, 2) and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.qemu
def test_fio_replays_what_qsim_writes(tmp_path, fio):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (8 << 20))
    t = synthesize(8 << 20, 300, "uniform", "4k/50:16k/50", read_share=0.6, flush_every=10, seed=5)
    log = str(tmp_path / "gen.iolog")
    write_trace(t, log, fio_file=str(disk))
    replay = subprocess.run([fio, "--name=replay", f"--read_iolog={log}", "--ioengine=psync", "--replay_no_stall=1",
                             "--output-format=json"], capture_output=True, text=True, cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    job = json.loads(replay.stdout)["jobs"][0]
    for op, name in ((READ, "read"), (WRITE, "write")):
        assert job[name]["total_ios"] == int((t.op == op).sum())
        assert job[name]["io_bytes"] == int(t.length[t.op == op].sum())


@pytest.mark.qemu
def test_qsim_reads_what_fio_records(tmp_path, fio):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (16 << 20))
    rec = subprocess.run([fio, "--name=rec", f"--filename={disk}", "--size=16M", "--rw=randrw", "--bs=4k",
                          "--fsync=8", "--number_ios=400", "--ioengine=psync", "--randseed=7",
                          f"--write_iolog={tmp_path / 'rec.iolog'}", "--output-format=json"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert rec.returncode == 0, rec.stderr
    job = json.loads(rec.stdout)["jobs"][0]
    t = read_trace(str(tmp_path / "rec.iolog"))
    assert t.time is not None and (np.diff(t.time) >= 0).all()
    for op, name in ((READ, "read"), (WRITE, "write")):
        assert int((t.op == op).sum()) == job[name]["total_ios"]
        assert int(t.length[t.op == op].sum()) == job[name]["io_bytes"]
    assert int((t.op == FLUSH).sum()) == job["sync"]["total_ios"]


def test_prefetched_chunks_are_the_chunks_in_order_with_errors_where_they_happened():
    """The reader thread starts reading at once, hands over every chunk in order, holds at most the budget (plus
    one chunk), raises the reader's error after the chunks before it, and stops when the consumer stops."""
    import threading

    from qsim.errors import QsimError
    from qsim.traceio.prefetch import prefetched

    made = []

    def chunks(fail_at=None):
        for k in range(40):
            if k == fail_at:
                raise QsimError(f"t.iolog: line {k}: bad")
            made.append(k)
            yield np.full(1000, k, dtype=np.int64)  # 8000 bytes each

    got = [int(c[0]) for c in prefetched(chunks(), budget_bytes=20_000)]
    assert got == list(range(40))
    seen = []
    with pytest.raises(QsimError, match="t.iolog: line 25: bad"):
        for c in prefetched(chunks(fail_at=25), budget_bytes=20_000):
            seen.append(int(c[0]))
    assert seen == list(range(25))
    made.clear()
    stream = prefetched(chunks(), budget_bytes=20_000)
    for _ in range(500):  # the reader starts at once, before the first chunk is asked for
        if made:
            break
        threading.Event().wait(0.01)
    assert made
    assert int(next(stream)[0]) == 0
    stream.close()  # the consumer stops: the reader stops within the budget instead of reading the rest
    for thread in threading.enumerate():
        if thread.name == "qsim-trace-reader":
            thread.join(5)
    assert len(made) <= 5
    readers = lambda: [t for t in threading.enumerate() if t.name == "qsim-trace-reader"]  # noqa: E731
    stream = prefetched(chunks(), budget_bytes=20_000)
    del stream  # dropped before its first chunk: the reader, waiting for room, stops too
    for thread in readers():
        thread.join(5)
    assert not readers()
