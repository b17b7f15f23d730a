"""What the public-trace and QEMU-log readers share: records in chunks, one volume (compressed input: ``compressed``).

Every reader here turns its file into ``Raw`` chunks: columns of op, offset, length, integer time ticks, the volume
key of each record (or None) and where each record came from (line number for text, record number for binary), so
errors name file:line. ``select`` keeps one volume and makes times seconds since the first kept request; ``survey``
counts requests per volume (what ``qsim trace info`` lists).
"""

from __future__ import annotations

import io
import os
import stat
from contextlib import contextmanager
from typing import IO, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from ..errors import QsimError, UsageError
from ..trace import DISCARD, FLUSH, READ, WRITE, Trace
from . import compressed
from .textfile import check_readable, open_binary

CHUNK_RECORDS = 1 << 20


def compression(path: str) -> str | None:
    """'gzip', 'zstd' or None, from the file's first bytes (never from its name)."""
    check_readable(path)
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
        raise QsimError(f"{path}: not a regular file (a FIFO, socket or device); qsim reads trace files")
    with open(path, "rb") as f:
        return compressed.kind(f.read(4))


@contextmanager
def reading(path: str):
    """Turn a read failure (I/O, damaged gzip or zstd data) into one QsimError naming the file."""
    try:
        yield
    except QsimError:
        raise
    except (OSError, EOFError) as exc:
        raise QsimError(f"{path}: cannot read ({exc})") from None
    except Exception as exc:  # zstandard.ZstdError and friends
        raise QsimError(f"{path}: damaged compressed data ({exc})") from None


def head_bytes(path: str, size: int = 64 * 1024) -> bytes:
    """The first ``size`` decompressed bytes (for format detection)."""
    with open_binary(path) as f, reading(path):
        return read_exactly(f, size)


def read_exactly(f: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes: less only at the end of the stream (decompressors return short reads)."""
    parts, want = [], size
    while want > 0:
        block = f.read(want)
        if not block:
            break
        parts.append(block)
        want -= len(block)
    return b"".join(parts)


def read_into(path: str, f: IO[bytes], buffer) -> int:
    """Fill ``buffer`` from ``f`` (short only at the end of the stream); the number of bytes read."""
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        with reading(path):
            n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def byte_chunks(path: str, chunk_bytes: int = 64 << 20, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The decompressed file in blocks of about ``chunk_bytes`` (of an uncompressed file: bytes start .. end)."""
    with open_binary(path) as f:
        if start or end is not None:
            f.seek(start)
        left = None if end is None else end - start
        while True:
            if left is not None:
                if left <= 0:
                    return
                chunk_bytes = min(chunk_bytes, left)
            with reading(path):
                block = read_exactly(f, chunk_bytes)
            if not block:
                return
            if left is not None:
                left -= len(block)
            yield block


def line_blocks(path: str, chunk_bytes: int = 32 << 20, start: int = 0, end: int | None = None,
                first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, block of whole lines): the text in pieces cut at line ends (of an
    uncompressed file, bytes start .. end, whose first line is number ``first_line``)."""
    line, rest = first_line, b""
    for block in byte_chunks(path, chunk_bytes, start, end):
        block = rest + block
        cut = block.rfind(b"\n") + 1
        if cut == 0:
            rest = block
            continue
        rest = block[cut:]
        yield line, block[:cut]
        line += block.count(b"\n", 0, cut)
    if rest:
        yield line, rest + b"\n"


class Raw(NamedTuple):
    """One chunk of records as read, before volume selection (see the module note)."""

    op: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    ticks: np.ndarray | None  # int64 time in the format's own unit, or None
    key: np.ndarray | None  # volume of each record, or None for single-volume formats
    where: np.ndarray  # line (text) or record (binary) number of each record


def select(path: str, chunks: Iterable[Raw], wanted, option: str, tick_seconds: float,
           show: Callable = str, parse_key: Callable | None = None, unit: str = "line") -> Iterator[Trace]:
    """Traces of one volume: ``wanted`` (as the user typed it), or the only one in the file (an error naming the
    line of the second volume otherwise). Times become seconds since the first kept request."""
    want = None if wanted is None else (parse_key(wanted) if parse_key else wanted)
    first_key, t0, seen = None, None, set()
    for raw in chunks:
        if raw.key is not None:
            if want is None:
                if first_key is None and len(raw.key):
                    first_key = raw.key[0]
                other = raw.key != first_key
                if other.any():
                    k = int(np.argmax(other))
                    raise QsimError(f"{path}: {unit} {raw.where[k]}: a second volume {show(raw.key[k])} (after "
                                    f"{show(first_key)}); choose one with {option} (qsim trace info {path} lists "
                                    "them)")
            else:
                if len(seen) < 1000:
                    seen.update(np.unique(raw.key).tolist())
                keep = raw.key == want
                if not keep.all():
                    raw = Raw(*(c if c is None else c[keep] for c in raw))
        if not len(raw.op):
            continue
        time = None
        if raw.ticks is not None:
            if t0 is None:
                t0 = int(raw.ticks[0])
            time = (raw.ticks - t0) * tick_seconds
        yield Trace.from_arrays(raw.op, raw.offset, raw.length, time, path)
    if want is not None and t0 is None and want not in seen:
        listed = ", ".join(show(k) for k in sorted(seen)[:20]) or "none"
        raise QsimError(f"{path}: {option} {wanted} is not in the file (it has: {listed})")


def survey(chunks: Iterable[Raw], show: Callable = str) -> list[dict]:
    """Per volume, in order of first appearance: request counts by op, bytes and the largest end offset (counted
    with bincount per chunk, so a file of thousands of volumes costs no more than one of a few)."""
    found: dict = {}
    for raw in chunks:
        if not len(raw.op):
            continue
        if raw.key is None:
            keys, first, inverse = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.intp), None
        else:
            keys, first, inverse = np.unique(raw.key, return_index=True, return_inverse=True)
        k = len(keys)
        index = np.zeros(len(raw.op), dtype=np.intp) if inverse is None else inverse.ravel()
        counts = {name: np.bincount(index[raw.op == code], minlength=k) for name, code in
                  (("reads", READ), ("writes", WRITE), ("discards", DISCARD), ("flushes", FLUSH))}
        total = np.bincount(index, minlength=k)
        nbytes = np.bincount(index, weights=raw.length.astype(np.float64), minlength=k)
        ends = np.zeros(k, dtype=np.int64)
        np.maximum.at(ends, index, raw.offset.astype(np.int64) + raw.length.astype(np.int64))
        for i in np.argsort(first, kind="stable").tolist():
            key = keys[i].item() if hasattr(keys[i], "item") else keys[i]
            entry = found.setdefault(key, {"volume": show(key) if raw.key is not None else None, "requests": 0,
                                           "reads": 0, "writes": 0, "discards": 0, "flushes": 0, "bytes": 0,
                                           "max_end_offset": 0, "first": int(raw.where[first[i]])})
            entry["requests"] += int(total[i])
            for name, column in counts.items():
                entry[name] += int(column[i])
            entry["bytes"] += int(nbytes[i])
            entry["max_end_offset"] = max(entry["max_end_offset"], int(ends[i]))
    return list(found.values())


def no_selection(path: str, fmt: str, value, option: str) -> None:
    if value is not None:
        raise UsageError(f"{option}: {path} is a {fmt} trace, which holds one volume (nothing to select)")


def first_bad(path: str, lines: Iterable[tuple[int, bytes]], problem: Callable[[bytes], str | None],
              fallback: str) -> QsimError:
    """The error for the first line ``problem`` objects to (the slow pass behind a failed fast parse)."""
    for number, text in lines:
        reason = problem(text)
        if reason:
            shown = text.decode("utf-8", errors="replace")[:120]
            return QsimError(f"{path}: line {number}: {reason}: {shown!r}")
    return QsimError(f"{path}: {fallback}")


def numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its end) over the decompressed file: for the slow pass that explains an error."""
    with open_binary(path) as f:
        for number, raw in enumerate(io.BufferedReader(f, 1 << 20), start=1):
            yield number, raw.rstrip(b"\r\n")


def has_header(path: str, names: tuple[str, ...]) -> bool:
    """Whether the first line is the format's documented column names (then it is skipped)."""
    first = head_bytes(path, 4096).split(b"\n", 1)[0].decode("utf-8", errors="replace")
    return first.strip().lower().replace(" ", "") == ",".join(names).lower()


def csv_raws(path: str, fmt: str, names: tuple[str, ...], dtypes: dict, convert: Callable, problem: Callable,
             chunk_lines: int = CHUNK_RECORDS) -> Iterator[Raw]:
    """A headerless (or documented-header) CSV in chunks through pandas' C parser; ``convert(frame, first_line)``
    makes each chunk's Raw. When the fast parser fails, a slow pass finds the first line ``problem`` rejects."""
    import pandas as pd

    skip = 1 if has_header(path, names) else 0
    first_line = 1 + skip
    try:
        with open_binary(path) as stream:
            reader = pd.read_csv(stream, header=None, names=list(names), dtype=dtypes, skiprows=skip, engine="c",
                                 chunksize=chunk_lines, skip_blank_lines=False, na_filter=True,
                                 skipinitialspace=True)
            for frame in reader:
                raw = convert(frame, first_line)
                first_line += len(frame)
                yield raw
    except (ValueError, OverflowError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise first_bad(path, ((n, t) for n, t in numbered_lines(path) if n > skip), problem,
                        f"cannot parse as {fmt} ({str(exc).strip()[:200]})") from None


def check_columns(path: str, where: np.ndarray, offset: np.ndarray, length: np.ndarray,
                  what: tuple[str, str] = ("offset", "length")) -> None:
    """Offsets must be >= 0 and lengths 1 .. 4 GiB - 1 (in bytes, after unit conversion): the line of the first
    that is not."""
    bad = offset < 0
    if bad.any():
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {where[k]}: {what[0]} {offset[k]} is negative")
    bad = (length <= 0) | (length > 2**32 - 1)
    if bad.any():
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {where[k]}: {what[1]} {length[k]} is not valid (expected 1 to 4294967295 "
                        "bytes)")


def field_problem(want: int, checks: list[tuple[str, Callable[[str], bool], str]]) -> Callable[[bytes], str | None]:
    """A line checker for ``first_bad``: ``want`` comma-separated fields, each passing its (name, test, expected)."""

    def problem(line: bytes) -> str | None:
        fields = [f.strip() for f in line.decode("utf-8", errors="replace").split(",")]
        if len(fields) != want:
            return f"expected {want} comma-separated fields, found {len(fields) if line.strip() else 0}"
        for value, (name, test, expected) in zip(fields, checks):
            if not test(value):
                return f"{name} {value!r} is not {expected}"
        return None

    return problem


def is_count(text: str) -> bool:
    return text.isdigit()


def op_codes(path: str, column, where: np.ndarray, ops: dict, expected: str) -> np.ndarray:
    """A text column of op names (``ops``' keys, any case) as op codes; the line of the first other value."""
    op = column.astype(str).str.strip().str.lower().map({k.lower(): v for k, v in ops.items()})
    if op.isna().any():
        k = int(np.argmax(op.isna().to_numpy()))
        raise QsimError(f"{path}: line {where[k]}: {column.name} {column.iloc[k]!r} is not {expected}")
    return op.to_numpy(dtype=np.uint8)


def looks_like(lines: list[str], names: tuple[str, ...], line) -> bool:
    """The first line is the documented header, or the first ten lines all have the format's shape."""
    body = [text.strip() for text in lines if text.strip()]
    if body and body[0].lower().replace(" ", "") == ",".join(names).lower():
        return True
    return bool(body) and all(line.fullmatch(text) for text in body[:10])


def whole_number_volume(text: str, what: str) -> int:
    if not str(text).strip().isdigit():
        raise UsageError(f"--volume {text!r}: {what} (a whole number)")
    return int(text)
