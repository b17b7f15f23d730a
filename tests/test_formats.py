"""The formats beyond qsim's own: real QEMU logs, the real CloudPhysics vscsi trace, blktrace binary against real
blkparse's text of it, and the MSR / Alibaba / Tencent layouts (spec-built fixtures), plain, gzip and zstd; exact
counts and records, volume selection, and a one-line file:line error for bad input of every kind."""

from __future__ import annotations

import builtins
import re
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsim.errors import QsimError
from qsim.trace import DISCARD, FLUSH, READ, WRITE
from qsim.traceio import detect_format, iter_trace, read_trace
from qsim.traceio.blkparse import read_blkparse
from qsim.traceio.registry import survey
from qsim.traceio.vscsi import V1, V2

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "traces"
SHARED = ROOT.parent / "shared" / "traces"  # CI puts shared/ beside the clone
VSCSI = SHARED / "cloudPhysicsIO.vscsi"
VSCSI_CSV = SHARED / "cloudPhysicsIO.csv.gz"
QEMU72 = str(FIX / "qemu-7.2-two-drives.log")
DRIVE0, DRIVE1 = "0x56286627e280", "0x56286628b280"


def qsim(*args):
    proc = subprocess.run([sys.executable, "-m", "qsim", *map(str, args)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(call, match):
    with pytest.raises(QsimError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


# --- QEMU trace logs ------------------------------------------------------------------------------------------------

def test_qemu_log_with_timestamps_two_drives():
    assert detect_format(QEMU72) == "qemu-log"
    one_line_error(lambda: read_trace(QEMU72), r"line 7: a second volume 0x56286628b280 \(after 0x56286627e280\); "
                                              r"choose one with --device")
    d0 = read_trace(QEMU72, device=DRIVE0)
    assert d0.op.tolist() == [WRITE, READ, READ, WRITE, READ, WRITE]  # write -z (flags 0x2) is a write
    assert d0.offset.tolist() == [0, 0, 65536, 131072, 4096, 0]
    assert d0.length.tolist() == [65536, 4096, 8192, 65536, 4096, 4096]  # the zero-length read is left out
    assert d0.time.tolist() == pytest.approx([0, 0.022434, 0.091277, 0.119186, 0.222411, 0.261215], abs=1e-9)
    d1 = read_trace(QEMU72, device=DRIVE1.upper().replace("X", "x"))
    assert d1.op.tolist() == [WRITE, READ, WRITE, READ]
    assert d1.offset.tolist() == [1048576, 1048576, 2147479552, 0]
    assert d1.length.tolist() == [4096, 16384, 4096, 512]
    volumes = survey(QEMU72, "qemu-log")
    assert [(v["volume"], v["requests"], v["reads"], v["writes"], v["first"]) for v in volumes] == [
        (DRIVE0, 6, 3, 3, 5), (DRIVE1, 4, 2, 2, 7)]
    one_line_error(lambda: read_trace(QEMU72, device="0x1234"), r"--device 0x1234 is not in the file \(it has: "
                                                              r"0x56286627e280, 0x56286628b280\)")
    one_line_error(lambda: read_trace(QEMU72, device="zz"), "expected a BlockBackend pointer")
    one_line_error(lambda: read_trace(QEMU72, volume="1"), "--volume: applies to msr, alibaba and tencent traces; "
                                                          ".* is read as qemu-log")


def test_qemu_io_log_without_timestamps():
    path = str(FIX / "qemu-io-10.0.log")
    assert detect_format(path) == "qemu-log"
    probe = read_trace(path, device="0x55db846031d0")  # qemu-io's format probe: its own BlockBackend
    assert (probe.op.tolist(), probe.offset.tolist(), probe.length.tolist(), probe.time) == ([READ], [0], [512], None)
    t = read_trace(path, device="0x55db84603c10")
    assert t.op.tolist() == [WRITE, READ, WRITE, READ] and t.time is None
    assert t.offset.tolist() == [0, 4096, 1048576, 65536] and t.length.tolist() == [65536, 4096, 4096, 131072]


def test_qemu_log_other_lines_skipped_malformed_reported(tmp_path):
    good = Path(QEMU72).read_text()
    noisy = tmp_path / "noisy.log"
    noisy.write_text(good.replace("\n5979@1796160972.242258",
                                  "\n5979@1796160972.200000:qcow2_cache_get co 0x1 is_l2_cache 1 offset 0x0 "
                                  "read_from_disk 1\nsome message from QEMU\n5979@1796160972.242258"))
    assert read_trace(str(noisy), device=DRIVE0).offset.tolist() == [0, 0, 65536, 131072, 4096, 0]
    for bad, problem in [("5979@1796160972.5:blk_co_pwritev blk 0x56286627e280 bs", "line 16: malformed "
                          "blk_co_pwritev trace line"),
                         ("blk_co_preadv blk 0x56286627e280 bs 0x1 offset -4 bytes 1 flags 0x0", "line 16: malformed "
                          "blk_co_preadv")]:
        path = tmp_path / "bad.log"
        path.write_text(good + bad + "\n")
        one_line_error(lambda: read_trace(str(path), device=DRIVE0), problem)
    mixed = tmp_path / "mixed.log"
    mixed.write_text(good + "blk_co_preadv blk 0x56286627e280 bs 0x1 offset 0 bytes 512 flags 0x0\n")
    one_line_error(lambda: read_trace(str(mixed), device=DRIVE0), "line 16: a trace line without a timestamp")
    empty = tmp_path / "quiet.log"
    empty.write_text("blk_co_preadv blk 0x5 bs 0x6 offset 0 bytes 0 flags 0x0\n")
    one_line_error(lambda: read_trace(str(empty)), "no blk_co_preadv/blk_co_pwritev lines")


def test_qemu_log_cli_info_lists_blockbackends_and_sweep_selects_one():
    rc, out, err = qsim("trace", "info", QEMU72)
    assert rc == 0, err
    assert out.splitlines()[0] == f"{QEMU72}: qemu-log, 2 BlockBackends; choose one with --device"
    assert re.search(rf"\n  {DRIVE0}\s+6\s+3\s+3\s+148 KiB\s+1G\s+5\n", out), out
    rc, out, _ = qsim("trace", "info", QEMU72, "--device", DRIVE1, "--output", "json")
    data = json.loads(out)
    assert rc == 0 and data["requests"] == 4 and len(data["volumes"]) == 2
    rc, out, err = qsim("sweep", QEMU72, "--device", DRIVE0, "--size", "1G", "--l2-cache-size", "64k,1M",
                        "--output", "csv")
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 3


# --- CloudPhysics vscsi ---------------------------------------------------------------------------------------------

needs_shared = pytest.mark.skipif(not VSCSI.exists(), reason=f"{VSCSI} absent (the shared real traces)")


@needs_shared
def test_vscsi_real_cloudphysics_trace():
    assert detect_format(str(VSCSI)) == "vscsi"
    t = read_trace(str(VSCSI))
    assert len(t) == 113872
    assert int((t.op == READ).sum()) == 46974 and int((t.op == WRITE).sum()) == 66898
    assert (t.op[0], t.offset[0], t.length[0]) == (WRITE, 42932745 * 512, 512)
    assert (t.op[-1], t.offset[-1], t.length[-1]) == (WRITE, 42936150 * 512, 512)
    assert t.max_end_offset == 33584938496
    assert t.time[0] == 0 and t.time[-1] == pytest.approx(7200.089885)
    chunks = list(iter_trace(str(VSCSI), chunk_requests=50000))
    assert [len(c) for c in chunks] == [50000, 50000, 13872]
    assert chunks[2].time[-1] == pytest.approx(7200.089885)  # times from the file's first request, across chunks


@needs_shared
def test_vscsi_binary_equals_the_published_csv():
    import pandas as pd

    csv = pd.read_csv(VSCSI_CSV)
    t = read_trace(str(VSCSI))
    assert csv["op"].map({"28": READ, "2a": WRITE}).tolist() == t.op.tolist()
    assert (csv["lbn"].to_numpy() * 512).tolist() == t.offset.tolist()
    assert csv["size"].tolist() == t.length.tolist()


@needs_shared
def test_vscsi_v2_and_compressed(tmp_path):
    v1 = np.fromfile(VSCSI, dtype=V1, count=1000)
    v2 = np.zeros(1000, dtype=V2)
    for name in V1.names:
        v2[name] = v1[name]
    v2["ver"] = 0x0200
    v2["rt"] = 77
    (tmp_path / "t.vscsi2").write_bytes(v2.tobytes())
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "t.vscsi.zst").write_bytes(zstandard.ZstdCompressor().compress(v1.tobytes()))
    (tmp_path / "t.vscsi.gz").write_bytes(gzip.compress(v1.tobytes()))
    want = read_trace(str(VSCSI)).select(np.arange(1000))
    for name in ("t.vscsi2", "t.vscsi.zst", "t.vscsi.gz"):
        path = str(tmp_path / name)
        assert detect_format(path) == "vscsi"
        got = read_trace(path)
        assert got.op.tolist() == want.op.tolist() and got.offset.tolist() == want.offset.tolist()
        assert got.length.tolist() == want.length.tolist() and got.time.tolist() == want.time.tolist()


@needs_shared
def test_vscsi_damage_is_named(tmp_path):
    data = bytearray(VSCSI.read_bytes()[:32 * 30])
    (tmp_path / "cut.vscsi").write_bytes(bytes(data[:-5]))  # detection wants whole records: --format says vscsi
    one_line_error(lambda: read_trace(str(tmp_path / "cut.vscsi"), format="vscsi"),
                   r"record 30: the file ends inside a record \(27 of 32 bytes; truncated\?\)")
    data[19 * 32 + 14:19 * 32 + 16] = b"\x00\x00"
    (tmp_path / "bad.vscsi").write_bytes(bytes(data))
    one_line_error(lambda: read_trace(str(tmp_path / "bad.vscsi")),
                   r"record 20 \(byte 608\): version field 0x0000 is not vscsi v1")


# --- blktrace binary ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["Q", "G", "I", "D", "C"])
def test_blktrace_equals_blkparse_text_of_it(action):
    text = read_blkparse(str(FIX / "blk.blkparse.txt"), action)
    for name in ("blk", "blk.blktrace.1", "blk-be"):  # NAME, any per-CPU file, big-endian
        t = read_trace(str(FIX / name), action=action)
        assert t.op.tolist() == text.op.tolist()
        assert t.offset.tolist() == text.offset.tolist() and t.length.tolist() == text.length.tolist()
        assert t.time.tolist() == pytest.approx(text.time.tolist(), abs=1e-12)


def test_blktrace_records_and_detection():
    assert detect_format(str(FIX / "blk")) == detect_format(str(FIX / "blk.blktrace.0")) == "blktrace"
    t = read_trace(str(FIX / "blk"))
    assert t.op.tolist() == [READ, WRITE, READ, DISCARD, FLUSH, WRITE, READ, WRITE, READ, WRITE]
    assert t.offset.tolist() == [2048 * 512, 8192 * 512, 4096 * 512, 100000 * 512, 0, 16384 * 512, 1 << 39,
                                 512 * 512, 77 * 512, 1 << 33]
    assert t.length.tolist() == [4096, 65536, 512, 1 << 20, 0, 4096, 131072, 8192, 1024, 4096]
    assert t.time[:2].tolist() == pytest.approx([0, 15e-6])
    assert len(read_trace(str(FIX / "blk"), action="X")) == 2  # the splits
    one_line_error(lambda: read_trace(str(FIX / "blk"), action="Z"), "not a blktrace action")


@pytest.mark.skipif(shutil.which("blkparse") is None, reason="blkparse not installed (apt-get install -y blktrace)")
def test_blktrace_fixture_text_is_what_blkparse_prints():
    if shutil.which("blkparse") is None:
        if os.environ.get("QSIM_REQUIRE_QEMU") == "1":
            pytest.fail("blkparse is required here (apt-get install -y blktrace)")
        pytest.skip("blkparse is not installed (apt-get install -y blktrace)")
    out = subprocess.run(["blkparse", "-i", "blk", "-D", str(FIX)], capture_output=True, text=True, check=True)

    def lines(text):  # blkparse names the input files with the folder given, which is where the clone is
        return [line for line in text.splitlines() if not line.startswith("Input file ")]

    assert lines(out.stdout) == lines((FIX / "blk.blkparse.txt").read_text())


def test_blktrace_damage_is_named(tmp_path):
    data = (FIX / "blk.blktrace.0").read_bytes()
    (tmp_path / "cut.blktrace.0").write_bytes(data[:-10])
    one_line_error(lambda: read_trace(str(tmp_path / "cut")), r"cut.blktrace.0: record 32 \(byte 1560\): the file "
                                                              r"ends inside a record")
    bad = bytearray(data)
    bad[48 + 16 + 48:48 + 16 + 52] = b"XXXX"  # the record after the note (48 bytes + 16 of payload) and one more
    (tmp_path / "bad.blktrace.0").write_bytes(bytes(bad))
    one_line_error(lambda: read_trace(str(tmp_path / "bad.blktrace.0")), r"record 3 \(byte 112\): no blk_io_trace "
                                                                        "magic")


# --- MSR Cambridge, Alibaba, Tencent --------------------------------------------------------------------------------

def test_msr_cambridge():
    path = str(FIX / "msr-hm.csv")
    assert detect_format(path) == "msr"
    assert [(v["volume"], v["requests"]) for v in survey(path, "msr")] == [("hm_0", 4), ("hm_1", 2)]
    one_line_error(lambda: read_trace(path), r"line 3: a second volume hm_1 \(after hm_0\); choose one with --volume")
    t = read_trace(path, volume="hm_0")
    assert t.op.tolist() == [READ, WRITE, WRITE, READ]
    assert t.offset.tolist() == [3774611456, 8237088768, 8237096960, 0]
    assert t.length.tolist() == [4096, 8192, 65536, 4096]
    assert t.time.tolist() == pytest.approx([0, 0.0042894, 0.0245496, 1.3438371], abs=1e-9)
    one_line_error(lambda: read_trace(path, volume="hm"), "an MSR volume is HOST_DISK")
    one_line_error(lambda: read_trace(path, volume="web_0"),
                   r"--volume web_0 is not in the file \(it has: hm_0, hm_1\)")
    one_line_error(lambda: read_trace(path, device="0x1"), "--device: applies to QEMU trace logs")


def test_alibaba_plain_and_zstd():
    pytest.importorskip("zstandard")
    for name in ("alibaba.csv", "alibaba.csv.zst"):
        path = str(FIX / name)
        assert detect_format(path) == "alibaba"
        assert [(v["volume"], v["requests"], v["reads"]) for v in survey(path, "alibaba")] == [("419", 4, 2),
                                                                                             ("27", 2, 1)]
        t = read_trace(path, volume="419")
        assert t.op.tolist() == [WRITE, READ, WRITE, READ]
        assert t.offset.tolist() == [8054669312, 8054669312, 1048576, 131072]
        assert t.length.tolist() == [4096, 4096, 16384, 131072]
        assert t.time.tolist() == pytest.approx([0, 0.001245, 0.009854, 0.499854])
        assert read_trace(path, volume="27").offset.tolist() == [0, 4096]


def test_tencent_plain_and_zstd_with_header(tmp_path):
    pytest.importorskip("zstandard")
    with_header = tmp_path / "t.csv"
    with_header.write_text("Timestamp,Offset,Size,IOType,VolumeID\n" + (FIX / "tencent.csv").read_text())
    for path in (str(FIX / "tencent.csv"), str(FIX / "tencent.csv.zst"), str(with_header)):
        assert detect_format(path) == "tencent"
        t = read_trace(path, volume="2381")
        assert t.op.tolist() == [WRITE, WRITE, READ, READ]
        assert t.offset.tolist() == [1188988288 * 512, 1188988296 * 512, 2048 * 512, 4194304 * 512]
        assert t.length.tolist() == [4096, 4096, 8192, 131072]
        assert t.time.tolist() == [0, 0, 5, 60]
    one_line_error(lambda: read_trace(str(with_header)), "line 4: a second volume 1000")


@pytest.mark.parametrize("fmt, text, problem", [
    ("msr", "128166372003061629,hm,0,Read,3774611456,4096,2290\n128166372003061630,hm,0,Trim,0,4096,1\n",
     "line 2: Type 'Trim' is not Read or Write"),
    ("msr", "128166372003061629,hm,0,Read,3774611456,4096,2290\n128166372003061630,hm,0,Read,-5,4096,1\n",
     "line 2: Offset -5 is negative"),
    ("msr", "128166372003061629,hm,0,Read,3774611456,0,2290\n", "line 1: Size 0 is not valid"),
    ("alibaba", "1,R,0,4096,1577808000000146\n1,R,0,4096\n", "line 2: expected 5 comma-separated fields, found 4"),
    ("alibaba", "1,R,0,4096,1577808000000146\n1,X,0,4096,1577808000000147\n", "line 2: opcode 'X' is not R or W"),
    ("alibaba", "1,R,0,4096,1577808000000146\n\n1,R,0,4096,1577808000000147\n",
     "line 2: expected 5 comma-separated fields, found 0"),
    ("tencent", "1538323200,0,8,1,2381\n1538323200,0,8,2,2381\n", "line 2: IOType 2 is not 0 .read. or 1 .write."),
    ("tencent", "1538323200,0,8,1,2381\n1538323200,0,abc,1,2381\n", "line 2: Size 'abc' is not a number of sectors"),
])
def test_public_trace_errors_name_file_and_line(tmp_path, fmt, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    message = one_line_error(lambda: read_trace(str(path), format=fmt), problem)
    assert message.startswith(f"{path}: line ")


def _zstd_forms(zstandard, data: bytes) -> dict[str, bytes]:
    """The same bytes as zstd writes them in its several shapes: one frame with size and checksum, the streaming
    compressor's (no content size, many blocks), and several frames with a skippable frame between."""
    streaming = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    half = len(data) // 2
    skippable = (0x184D2A5E).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"qsm"
    return {"frame": zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data),
            "stream": streaming.compress(data) + streaming.flush(),
            "frames": zstandard.ZstdCompressor().compress(data[:half]) + skippable
            + zstandard.ZstdCompressor(level=19).compress(data[half:])}


TEXT_CASES = {  # name -> (text, format, reader options)
    "iolog-v3": (("fio version 3 iolog\n0 /dev/vda add\n0 /dev/vda open\n" + "".join(
        f"{i * 7} /dev/vda {('read', 'write', 'sync', 'trim')[i % 4]} {i * 53248 % (1 << 34)} {4096 * (1 + i % 3)}\n"
        for i in range(60_000))).encode(), "iolog", {}),
    "iolog-v2": (("fio version 2 iolog\n/dev/vda add\n" + "".join(
        f"/dev/vda read {i * 512} 512\n" for i in range(70_000))).encode(), "iolog", {}),
    "csv": (("op,offset,length,time\n" + "".join(f"{('read', 'write')[i % 2]},{i * 8192},4096,{i / 1000}\n"
                                                 for i in range(80_000))).encode(), "csv", {}),
    "blkparse": ((FIX / "blk.blkparse.txt").read_bytes(), "blkparse", {}),
    "qemu-log": (Path(QEMU72).read_bytes(), "qemu-log", {"device": DRIVE0}),
    "msr": ((FIX / "msr-hm.csv").read_bytes(), "msr", {"volume": "hm_0"}),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_formats_read_through_zstd_exactly_as_plain(tmp_path, case):
    """Every text format, zstd-compressed in each shape, is detected and read to the very arrays of the plain file,
    whole and streamed in chunks."""
    zstandard = pytest.importorskip("zstandard")
    data, fmt, options = TEXT_CASES[case]
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    want = read_trace(str(plain), **options)
    assert len(want) > 0 and detect_format(str(plain)) == fmt
    for shape, blob in _zstd_forms(zstandard, data).items():
        path = tmp_path / f"{case}.{shape}.zst"
        path.write_bytes(blob)
        assert detect_format(str(path)) == fmt, shape
        for got in (read_trace(str(path), **options), _joined(iter_trace(str(path), chunk_requests=5000, **options))):
            for column in ("op", "offset", "length", "time"):
                a, b = getattr(got, column), getattr(want, column)
                assert (a is None and b is None) or np.array_equal(a, b), (shape, column)


def _joined(chunks):
    from qsim.trace import concat

    return concat(list(chunks))


def test_zstd_without_the_package_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_zstandard(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstandard)
    one_line_error(lambda: read_trace(str(FIX / "tencent.csv.zst")), r"reading it needs the zstandard package: pip "
                                                                     r"install zstandard")


def test_unknown_and_binary_garbage_are_one_line(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(lambda: read_trace(str(fifo)), "not a regular file")  # and does not block
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    one_line_error(lambda: read_trace(str(junk)), "binary data, not a trace")
    pytest.importorskip("zstandard")
    import zstandard

    cut = tmp_path / "cut.csv.zst"
    cut.write_bytes((FIX / "alibaba.csv.zst").read_bytes()[:60])
    one_line_error(lambda: read_trace(str(cut), format="alibaba"), "the zstd data ends inside a frame")
    cut_gz = tmp_path / "cut.log.gz"
    cut_gz.write_bytes(gzip.compress(Path(QEMU72).read_bytes())[:-30])
    one_line_error(lambda: read_trace(str(cut_gz), format="qemu-log"), "the gzip data is truncated")
    junk_zst = tmp_path / "junk.zst"
    junk_zst.write_bytes(zstandard.ZstdCompressor().compress(bytes(range(256)) * 8))
    one_line_error(lambda: read_trace(str(junk_zst)), "binary data, not a trace")


def test_public_traces_through_the_cli(tmp_path):
    rc, out, err = qsim("trace", "info", FIX / "alibaba.csv")
    assert rc == 0 and "alibaba, 2 devices; choose one with --volume" in out
    out_path = tmp_path / "dev419.iolog.gz"
    rc, out, err = qsim("trace", "convert", FIX / "alibaba.csv.zst", out_path, "--volume", "419")
    assert rc == 0, err
    assert read_trace(str(out_path)).offset.tolist() == [8054669312, 8054669312, 1048576, 131072]
    rc, out, err = qsim("replay", FIX / "blk", "--size", "1T", "--l2-cache-size", "1M", "--output", "json")
    assert rc == 0, err
    assert json.loads(out)[0]["l2_lookups"] > 0
    rc, out, err = qsim("trace", "info", FIX / "tencent.csv", "--volume", "x")
    assert rc == 2 and err.count("\n") == 1 and "a Tencent volume is a VolumeID" in err
