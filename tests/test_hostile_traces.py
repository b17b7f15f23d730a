"""Hostile trace files: every format truncated, with bad numbers, huge fields, NULs, invalid UTF-8, overflows,
negative values, wrong column counts, empty, binary garbage; and files that are not files. Each goes through
``qsim trace info`` and ``qsim replay`` in a fresh process: no traceback, no signal, no hang, exit 1 or 2 with one
stderr line naming the file, and the input byte-identical afterwards."""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from qsim.errors import QsimError
from qsim.traceio import iter_trace, read_trace
from qsim.traceio.npz import FORMAT_TAG

ROOT = Path(__file__).resolve().parent.parent
V3 = "fio version 3 iolog\n0 /dev/vda add\n0 /dev/vda open\n"
V2 = "fio version 2 iolog\n/dev/vda add\n"
CSV = "op,offset,length\n"
BLK = "  8,0    1        1     0.000000000  1234  Q   R {} + {} [fio]\n"
GOOD_IOLOG = (V3 + "".join(f"{i} /dev/vda read {i * 4096} 4096\n" for i in range(2000))).encode()


def compressed_magic() -> bytes:
    from qsim.traceio.compressed import ZSTD_MAGIC

    return ZSTD_MAGIC


def npz(**columns) -> bytes:
    columns.setdefault("format", np.array(FORMAT_TAG))
    out = io.BytesIO()
    np.savez(out, **columns)
    return out.getvalue()


def good_columns(n=3):
    return {"op": np.zeros(n, np.uint8), "offset": np.arange(n, dtype=np.int64) * 4096,
            "length": np.full(n, 4096, np.uint32)}


def with_column(**change):
    columns = good_columns()
    columns.update(change)
    return npz(**columns)


# name -> (content, the message's gist)
HOSTILE = {
    # fio iolog
    "truncated.iolog.gz": (gzip.compress(GOOD_IOLOG)[:-200], "gzip data is truncated"),
    "bad-number.iolog": (V3 + "1 /dev/vda read 12x 4096\n", "line 4: offset '12x' is not a whole number"),
    "fullwidth.iolog": (V3 + "1 /dev/vda read １２ 4096\n", "line 4: offset '１２' is not a whole number"),
    "fullwidth-time.iolog": (V3 + "１ /dev/vda read 0 4096\n", "line 4: timestamp '１' is not a whole number"),
    "huge-field.iolog": (V3 + "1 /dev/vda read " + "9" * 500_000 + " 4096\n",
                         "... (500000 characters) is not a byte offset"),
    "huge-line.iolog": (V3 + "1 /dev/vda read 0 4096 " + "9" * 9_000_000 + "\n", "line 4: longer than 1 MiB"),
    "nul.iolog": (GOOD_IOLOG + b"1 /dev/vda re\0ad 0 4096\n", "line 2004: unknown action 're\\x00ad'"),
    "nul-early.iolog": (V3 + "1 /dev/vda re\0ad 0 4096\n", "binary data"),
    "invalid-utf8.iolog": (V3.encode() + b"1 /dev/vda r\xff\xfead 0 4096\n", "line 4: unknown action"),
    "overflow-offset.iolog": (V3 + "1 /dev/vda read 9223372036854775808 4096\n", "line 4: offset 9223372036854775808"),
    "overflow-end.iolog": (V3 + "1 /dev/vda read 9223372036854771712 4096\n", "beyond 2^63 - 1"),
    "overflow-length.iolog": (V3 + "1 /dev/vda read 0 4294967296\n", "line 4: length 4294967296 is not valid"),
    "negative-offset.iolog": (V3 + "1 /dev/vda write -4096 4096\n", "line 4: offset -4096 is not a byte offset"),
    "negative-time.iolog": (V3 + "-1 /dev/vda read 0 4096\n", "line 4: timestamp '-1'"),
    "too-many-fields.iolog": (V3 + "1 /dev/vda read 0 4096 7\n", "line 4: expected TIME FILE ACTION"),
    "action-only.iolog": (V3 + "0 read\n", "line 4: expected TIME FILE ACTION [OFFSET LENGTH], found 2 fields"),
    "file-only.iolog": (V3 + "1 /dev/vda\n", "line 4: expected TIME FILE ACTION [OFFSET LENGTH], found 2 fields"),
    "v2-missing-length.iolog": (V2 + "/dev/vda read 0\n", "line 3: read needs an offset and a length"),
    "v2-action-only.iolog": (V2 + "read\n", "line 3: expected FILE ACTION [OFFSET LENGTH], found 1 fields"),
    "binary-body.iolog": (V3.encode() + bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)),
                          "binary data"),
    # CSV
    "truncated.csv.gz": (gzip.compress((CSV + "read,0,4096\n" * 5000).encode())[:-100], "gzip data is truncated"),
    "bad-number.csv": (CSV + "read,zero,4096\n", "line 2: offset 'zero' is not a whole number of bytes"),
    "fullwidth.csv": (CSV + "read,１,4096\n", "line 2: offset '１' is not a whole number of bytes"),
    "huge-field.csv": (CSV + "x" * 900_000 + ",0,4096\n", "line 2: unknown op 'xxxx"),
    "huge-line.csv": (CSV + "x" * 10_000_000 + ",0,4096\n", "line 2: longer than 1 MiB"),
    "nul.csv": (CSV + "read,0,4096\n" * 500 + "read,0\0,4096\n", "line 502: offset '0\\x00' is not a whole number"),
    "invalid-utf8.csv": (CSV.encode() + b"r\xffad,0,4096\n", "line 2: unknown op"),
    "overflow.csv": (CSV + "read,9223372036854775807,4096\n", "line 2: the request ends beyond byte 2^63 - 1"),
    "overflow-digits.csv": (CSV + "read,99999999999999999999999,4096\n", "line 2: offset '9999"),
    "negative.csv": (CSV + "read,0,4096\nwrite,-1,4096\n", "line 3: offset -1 is negative"),
    "too-many-fields.csv": (CSV + "read,0,4096,5\n", "line 2: expected 3 fields like the header, found 4"),
    "too-few-fields.csv": (CSV + "read,0\n", "line 2: expected 3 fields like the header, found 2"),
    "unclosed-quote.csv": (CSV + '"read,0,4096\n', "line 2: a quoted field is not closed"),
    "bad-time.csv": ("op,offset,length,time\nread,0,4096,nan\n", "line 2: time 'nan' is not a number of seconds"),
    "infinite-time.csv": ("op,offset,length,time\nread,0,4096,1e400\n", "line 2: time '1e400' is not a number"),
    "header-only-bad.csv": ("op,offset\nread,0\n", "line 1: the CSV header must name op,offset,length"),
    "duplicate-column.csv": ("op,offset,length,offset\nread,0,4096,0\n", "line 1: the CSV header names offset twice"),
    # blkparse
    "sector-2-54.blk": (BLK.format(2**54, 8), "line 1: sector 18014398509481984 + 8 ends beyond 2^63 - 1"),
    "sector-2-63.blk": (BLK.format(2**63, 8), "line 1: sector 9223372036854775808 + 8 ends beyond"),
    "sector-2-64.blk": (BLK.format(2**64, 8), "line 1: sector '18446744073709551616' + '8' is beyond any disk"),
    "fullwidth.blk": (BLK.format("１８", 8), "line 1: sector '１８' is not written in ASCII digits"),
    "fullwidth-time.blk": (BLK.replace("0.000000000", "０.0").format(8, 8), "time '０.0' is not written in ASCII"),
    "huge-nsect.blk": (BLK.format(0, 2**23), "line 1: 8388608 sectors is 4 GiB or more"),
    "bad-sector.blk": (BLK.format("12x", 8), "line 1: expected SECTOR + NSECT after the RWBS field, found '12x + 8"),
    "huge-time.blk": (BLK.replace("0.000000000", "9" * 400 + ".0").format(8, 8), "is not a number"),
    "truncated.blk.gz": (gzip.compress((BLK.format(8, 8) * 3000).encode())[:-100], "gzip data is truncated"),
    "no-queue-lines.blk": (BLK.replace(" Q ", " C ").format(8, 8), "no blkparse lines with action Q"),
    # npz
    "negative-offset.npz": (with_column(offset=np.array([0, -4096, 0])), "record 2: offset -4096 is negative"),
    "op-7.npz": (with_column(op=np.array([0, 7, 0], np.uint8)), "record 2: op code 7 is not one of 0-3"),
    "op-200.npz": (with_column(op=np.array([200, 0, 0], np.uint8)), "record 1: op code 200 is not one of 0-3"),
    "two-d.npz": (with_column(offset=np.zeros((3, 2), np.int64)), "column offset has shape (3, 2)"),
    "float-offset.npz": (with_column(offset=np.array([0.5, 0, 0])), "column offset holds float64"),
    "ragged.npz": (with_column(length=np.full(5, 4096, np.uint32)), "columns of different lengths"),
    "huge-offset.npz": (with_column(offset=np.array([0, 2**63, 0], np.uint64)), "record 2: offset 9223372036854775808"),
    "end-overflow.npz": (with_column(offset=np.array([0, 2**63 - 4096, 0], np.int64)), "record 2: the request"),
    "huge-length.npz": (with_column(length=np.array([0, 2**40, 0], np.int64)), "record 2: length 1099511627776"),
    "nan-time.npz": (with_column(time=np.array([0, np.nan, 1])), "record 2: time is not a finite number"),
    "no-tag.npz": (npz(format=np.array("other"), **good_columns()), "not a qsim binary trace"),
    "missing-column.npz": (npz(op=np.zeros(2, np.uint8), offset=np.zeros(2, np.int64)), "no length column"),
    "truncated.npz": (with_column()[:300], "damaged binary trace"),
    "not-a-zip.npz": (b"PK\x03\x04" + b"\x00" * 200, "damaged binary trace"),
    # anything
    "empty": (b"", "empty file"),
    "garbage": (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "binary data"),
    "nuls": (b"\x00" * 5000, "binary data"),
    "garbage.gz": (gzip.compress(bytes(range(256)) * 20), "binary data"),
    "bad-gzip.gz": (b"\x1f\x8b\x08\x00" + b"\xff" * 100, "damaged gzip data"),
    "blank-lines": (b"\n\n\n", "unknown trace format"),
}

try:
    import zstandard
except ImportError:  # the optional dependency: without it, zstd files get the install hint (tests/test_formats.py)
    zstandard = None
if zstandard is not None:
    def _zst(text) -> bytes:
        return zstandard.ZstdCompressor().compress(text.encode() if isinstance(text, str) else text)

    HOSTILE.update({
        "truncated.iolog.zst": (_zst(GOOD_IOLOG)[:-200], "the zstd data ends inside a frame (truncated file?)"),
        "truncated.csv.zst": (_zst(CSV + "read,0,4096\n" * 5000)[:-10], "the zstd data ends inside a frame"),
        "truncated.blk.zst": (_zst(BLK.format(8, 8) * 3000)[:-1], "the zstd data ends inside a frame"),
        "bad-number.iolog.zst": (_zst(V3 + "1 /dev/vda read 12x 4096\n"), "line 4: offset '12x' is not a whole"),
        "negative.csv.zst": (_zst(CSV + "read,0,4096\nwrite,-1,4096\n"), "line 3: offset -1 is negative"),
        "garbage.zst": (_zst(bytes(range(256)) * 20), "binary data"),
        "bad-zstd.zst": (compressed_magic() + b"\xff" * 100, "damaged zstd data"),
    })


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


DRIVER = """
import contextlib, io, json, sys, traceback
from qsim.cli import main
results = []
for path in sys.argv[1:]:
    for argv in (["trace", "info", path], ["replay", path]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main(argv)
            except SystemExit as exc:
                status = exc.code
            except BaseException:
                status = "traceback"
                err.write(traceback.format_exc())
        results.append([path, " ".join(argv[:-1]), status, err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    for name, (content, _) in HOSTILE.items():
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return d


def _run_driver(paths):
    proc = subprocess.run([sys.executable, "-c", DRIVER, *map(str, paths)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]  # a signal (segfault) shows here as a negative status
    return json.loads(proc.stdout)


def test_hostile_files_are_one_line_each_and_left_untouched(hostile):
    names = sorted(HOSTILE)
    before = {n: _digest(hostile / n) for n in names}
    groups = [[hostile / n for n in names[k::2]] for k in range(2)]  # two processes, one per core
    with ThreadPoolExecutor(2) as pool:
        results = [r for part in pool.map(_run_driver, groups) for r in part]
    assert len(results) == 2 * len(names)
    for path, command, status, err in results:
        name = Path(path).name
        gist = HOSTILE[name][1]
        lines = err.strip().splitlines()
        assert status in (1, 2), (name, command, status, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"qsim {command}: error: {path}: "), (name, command, err)
        assert gist in lines[0], (name, command, lines[0])
        assert len(lines[0]) < 400, (name, lines[0][:500])
    assert {n: _digest(hostile / n) for n in names} == before


def run_cli(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_fifo_proc_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "trace.iolog"
    os.mkfifo(fifo)
    link = tmp_path / "mem.csv"
    link.symlink_to("/proc/self/mem")
    cases = {str(fifo): "is not a regular file (a FIFO, device or socket)", "/proc/self/mem": "is a proc file",
             "/proc/self/status": "is a proc file", "/dev/zero": "is not a regular file",
             str(tmp_path): "is a directory", str(link): "is a proc file", str(tmp_path / "nope"): "no such file"}
    for path, command, status, err in _run_driver(list(cases)):  # a blocking open would hit the timeout
        assert status == 1 and err.strip().splitlines() == [f"qsim {command}: error: {path}: {cases[path]}"
                                                            + err.split(cases[path], 1)[1].rstrip()], err
    proc = run_cli("replay", str(fifo))  # and once through the real command line
    assert proc.returncode == 1 and proc.stderr.startswith(f"qsim replay: error: {fifo}: is not a regular file")


def test_bad_iolog_lines_are_errors_not_skipped(tmp_path):
    path = tmp_path / "t.iolog"
    path.write_text(V3 + "0 read\n1 /dev/vda\n2 /dev/vda read 0 4096\n")
    with pytest.raises(QsimError, match=r"line 4: expected TIME FILE ACTION \[OFFSET LENGTH\], found 2 fields"):
        read_trace(str(path))


def test_messages_quote_at_most_60_characters_of_a_field(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(CSV + "y" * 800_000 + ",0,4096\n")
    with pytest.raises(QsimError) as err:
        read_trace(str(path))
    assert str(err.value) == f"{path}: line 2: unknown op {'y' * 60!r}... (800000 characters) (expected read, " \
                             "write, discard or flush)"


def _streamed_peak(path: Path) -> tuple[int, int, int]:
    """(requests, largest chunk, peak traced memory) of streaming the file with iter_trace."""
    tracemalloc.start()
    total = biggest = 0
    for chunk in iter_trace(str(path)):
        total += len(chunk)
        biggest = max(biggest, len(chunk))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return total, biggest, peak


@pytest.mark.parametrize("fmt, head, line, size, copies", [
    ("csv", CSV, "read,0,4096\n", 4 << 20, (3, 12)),
    ("iolog", V3, "0 /dev/vda read 0 4096\n", 4 << 20, (3, 12)),
    ("blkparse", "", BLK.format(8, 8), 1 << 18, (5, 10)),
])
def test_gzip_bombs_stream_in_bounded_memory(tmp_path, fmt, head, line, size, copies):
    """Concatenated gzip members (small on disk, many times that as text): streaming holds a block at a time, so
    the peak does not grow with the text."""
    member = line.encode() * (size // len(line))
    results = []
    for n in copies:
        path = tmp_path / f"bomb{n}.{fmt}.gz"
        one = gzip.compress(member, compresslevel=9)
        path.write_bytes(gzip.compress(head.encode()) + one * n)
        results.append(_streamed_peak(path))
    (few, _, small_peak), (many, biggest, big_peak) = results
    assert (few, many) == tuple(n * (len(member) // len(line)) for n in copies)
    assert big_peak < 1.2 * small_peak + (4 << 20), (small_peak, big_peak)
    assert biggest <= 1 << 21


@pytest.mark.parametrize("fmt, head, line", [("csv", CSV, "read,0,4096\n"), ("iolog", V3, "0 /dev/vda read 0 4096\n")])
def test_zstd_bombs_stream_in_bounded_memory(tmp_path, fmt, head, line):
    """Concatenated zstd frames, each 4 MiB of text in a few hundred bytes: the decoder is fed a few blocks at a
    time, so the peak does not grow with the text (one frame decoded whole would be the whole frame)."""
    if zstandard is None:
        pytest.skip("zstandard is not installed (the optional 'zstd' extra)")
    member = line.encode() * ((4 << 20) // len(line))
    results = []
    for n in (5, 15):  # (from 3 blocks on, two chunks' columns are alive at once: the peak stops growing)
        path = tmp_path / f"bomb{n}.{fmt}.zst"
        one = zstandard.ZstdCompressor(level=19).compress(member)
        assert len(one) < len(member) // 1000
        path.write_bytes(_zst(head) + one * n)
        results.append(_streamed_peak(path))
    (few, _, small_peak), (many, biggest, big_peak) = results
    assert (few, many) == (5 * (len(member) // len(line)), 15 * (len(member) // len(line)))
    assert big_peak < 1.2 * small_peak + (4 << 20), (small_peak, big_peak)
    assert biggest <= 1 << 21


def test_reading_whole_refuses_a_trace_larger_than_free_memory(tmp_path, monkeypatch):
    from qsim.traceio import textfile

    path = tmp_path / "t.csv"
    path.write_text(CSV + "read,0,4096\n" * 1000)
    monkeypatch.setattr(textfile, "available_memory", lambda: 1000)
    with pytest.raises(QsimError, match=r"t.csv: the trace needs more memory than is free .*'qsim replay --size' "
                                        "streams it"):
        read_trace(str(path))


def test_npz_zip_members_must_be_arrays(tmp_path):
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("op.npy", b"not an array")
        z.writestr("format.npy", b"nor this")
    with pytest.raises(QsimError, match="not a qsim binary trace"):
        read_trace(str(path))
