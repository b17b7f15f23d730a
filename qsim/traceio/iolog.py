"""fio iolog, versions 2 and 3 (what ``fio --write_iolog`` records and ``--read_iolog`` replays).

v2: ``FILE add|open|close`` and ``FILE read|write|sync|datasync|trim|wait OFFSET LENGTH``; v3 puts a timestamp in
microseconds first. Fields are separated by spaces or tabs; blank lines are skipped; every other line must be one of
those shapes, with ASCII whole numbers, or the read stops naming the line and what is wrong with it.

Parsing is a numba scan over the file's bytes in blocks (tens of millions of lines per second, the text never held
whole in memory). ``line_problem`` is the plain reference for one line: the scan stops at the first line it
rejects and ``line_problem`` says why (the tests check the two agree line by line).
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
from numba import njit

from ..errors import QsimError
from ..safeio import atomic_output
from ..trace import DISCARD, FLUSH, READ, WRITE, Trace, concat
from .textfile import (MAX_INT64, QUOTE_CHARS, Block, Scratch, bare, gather, head_lines, is_ascii_digits,
                       line_blocks, line_text, shorten, skip_first_line, split_fields, whole_number)

HEADERS = {"fio version 2 iolog": 2, "fio version 3 iolog": 3}
IO_ACTIONS = {"read": READ, "write": WRITE, "trim": DISCARD, "sync": FLUSH, "datasync": FLUSH}
FILE_ACTIONS = {"add", "open", "close"}
OTHER_ACTIONS = {"wait"}
ALL_ACTIONS = set(IO_ACTIONS) | FILE_ACTIONS | OTHER_ACTIONS
MAX_LENGTH = 2**32 - 1
CHUNK_LINES = 1 << 21


def _word(text: str) -> int:
    return int.from_bytes(text.encode(), "little")


# Actions as their bytes packed little-endian into an integer (all are at most 8 bytes): the scan compares numbers.
_W_READ, _W_WRITE, _W_TRIM, _W_SYNC, _W_DATASYNC = (_word(w) for w in ("read", "write", "trim", "sync", "datasync"))
_W_ADD, _W_OPEN, _W_CLOSE, _W_WAIT = (_word(w) for w in ("add", "open", "close", "wait"))
_W_WRIT = _word("writ")


def iolog_version(path: str) -> int | None:
    lines = head_lines(path, 1)
    return HEADERS.get(lines[0].strip()) if lines else None


def read_iolog(path: str, file: str | None = None) -> Trace:
    """Requests of one file of a fio iolog. ``file`` picks one when the log names several (required then)."""
    chunks = gather(path, _chunks(path), lambda chunk: chunk.trace.nbytes)
    files = set().union(*(chunk.files for chunk in chunks))
    return _pick_file(path, chunks, files, file)


def iter_iolog(path: str, file: str | None = None):
    """The log's requests in chunks (a block of text at a time), never holding the whole text or trace: for traces
    larger than memory. A second file showing up without ``file`` is an error at that point."""
    seen: set[str] = set()
    for chunk in _chunks(path):
        seen |= chunk.files
        if file is None and len(seen) > 1:
            raise QsimError(f"{path}: the log names several files ({', '.join(sorted(seen))}); choose one with --file")
        if file is None or file in chunk.files:
            yield _pick_file(path, [chunk], chunk.files, file)
    if file is not None and file not in seen:
        raise QsimError(f"{path}: --file {file!r} is not in the log (it names: {', '.join(sorted(seen)) or 'none'})")


class _Chunk(NamedTuple):
    trace: Trace
    file_ids: np.ndarray | None  # per request, an index into ``names``; None: every request names ``names[0]``
    names: list[str]

    @property
    def files(self) -> set[str]:
        return set(self.names)


def _chunks(path: str):
    version = iolog_version(path)
    if version is None:
        raise QsimError(f"{path}: line 1: expected 'fio version 2 iolog' or 'fio version 3 iolog'")
    scratch = new_scratch()
    for block in line_blocks(path):
        if block.first_line == 1:  # the header, checked above
            block = skip_first_line(block)
        if block.data.size:
            chunk = parse_block(path, block, version, scratch)
            if chunk is not None:
                yield chunk


def new_scratch() -> Scratch:
    return Scratch(op=(np.uint8, ()), offset=(np.int64, ()), length=(np.uint32, ()), usec=(np.int64, ()),
                   change=(np.int64, (3,)))


def parse_block(path: str, block: Block, version: int, scratch: Scratch) -> _Chunk | None:
    """The requests of a block of whole lines (the header excluded), or QsimError naming the first bad line."""
    a = scratch.get(block.newlines + 1)
    status = np.zeros(3, np.int64)
    _scan(block.data, version, a["op"], a["offset"], a["length"], a["usec"], a["change"], status)
    n, bad_line, changes = (int(v) for v in status)
    if bad_line >= 0:
        text = line_text(block.data, bad_line)
        problem = line_problem(split_fields(text), version) or "cannot be read as an iolog line"
        raise QsimError(f"{path}: line {block.first_line + bad_line}: {problem}: {text[:QUOTE_CHARS]!r}")
    if n == 0:
        return None
    change = a["change"][:changes]
    names_in_order = [block.data[s:e].tobytes().decode("utf-8", errors="replace") for _, s, e in change]
    names = list(dict.fromkeys(names_in_order))
    file_ids = None
    if len(names) > 1:
        ids = np.array([names.index(name) for name in names_in_order], dtype=np.int32)
        file_ids = np.repeat(ids, np.diff(np.append(change[:, 0], n)))
    time = a["usec"][:n] / 1e6 if version == 3 else None
    trace = Trace(a["op"][:n].copy(), a["offset"][:n].copy(), a["length"][:n].copy(), time, path)
    return _Chunk(trace, file_ids, names)


@njit(cache=True, nogil=True)
def _number(buf, s, e):
    """ASCII digits buf[s:e] as an int64; -1 if not all digits; -2 if '-' and digits ("-0" too); -3 digits beyond
    INT64_MAX."""
    if s >= e:
        return -1
    negative = buf[s] == 45
    if negative:
        s += 1
        if s >= e:
            return -1
    value = 0
    big = False
    for i in range(s, e):
        d = np.int64(buf[i]) - 48
        if d < 0 or d > 9:
            return -1
        if i - s < 18:  # 18 digits cannot overflow: no division on the common path
            value = value * 10 + d
        elif value > (9223372036854775807 - d) // 10:
            big = True  # still a whole number, just a hopeless one
        else:
            value = value * 10 + d
    if negative:
        return -2
    return -3 if big else value


@njit(cache=True, nogil=True)
def _packed(buf, s, e):
    if e - s > 8:
        return -1
    word = 0
    for i in range(e - 1, s - 1, -1):
        word = (word << 8) | buf[i]
    return word


@njit(cache=True, nogil=True)
def _general_line(buf, pos, n, version, fs, fe):
    """Any line, by the rules of ``line_problem``: (kind, code, offset, length, time, file field start, end, next
    line's start); kind 0 nothing to keep (blank, add/open/close/wait), 1 a request, -1 a bad line."""
    want = 5 if version == 3 else 4
    end = pos
    while end < n and buf[end] != 10:
        end += 1
    nxt = end + 1
    stop = end - 1 if end > pos and buf[end - 1] == 13 else end
    nf = 0
    i = pos
    while i < stop:
        c = buf[i]
        if c == 32 or c == 9:
            i += 1
            continue
        s = i
        while i < stop and buf[i] != 32 and buf[i] != 9:
            i += 1
        if nf < 6:
            fs[nf] = s
            fe[nf] = i
        nf += 1
    if nf == 0:
        return 0, 0, 0, 0, 0, 0, 0, nxt
    if nf != want and nf != want - 2:
        return -1, 0, 0, 0, 0, 0, 0, nxt
    k = 0
    t = 0
    if version == 3:
        t = _number(buf, fs[0], fe[0])
        if t < 0:
            return -1, 0, 0, 0, 0, 0, 0, nxt
        k = 1
    w = _packed(buf, fs[k + 1], fe[k + 1])
    code = -1
    if w == _W_READ:
        code = 0
    elif w == _W_WRITE:
        code = 1
    elif w == _W_TRIM:
        code = 2
    elif w == _W_SYNC or w == _W_DATASYNC:
        code = 3
    elif w == _W_ADD or w == _W_OPEN or w == _W_CLOSE or w == _W_WAIT:
        code = 9
    if code < 0:
        return -1, 0, 0, 0, 0, 0, 0, nxt
    if nf != want:
        return (0 if code == 9 else -1), 0, 0, 0, 0, 0, 0, nxt  # an I/O action needs offset and length
    o = _number(buf, fs[k + 2], fe[k + 2])
    ln = _number(buf, fs[k + 3], fe[k + 3])
    if o == -1 or ln == -1:
        return -1, 0, 0, 0, 0, 0, 0, nxt  # not a whole number
    if code == 9:
        return 0, 0, 0, 0, 0, 0, 0, nxt
    if o < 0:
        return -1, 0, 0, 0, 0, 0, 0, nxt
    if code == 3:
        ln = 0
    elif ln <= 0 or ln > 4294967295 or o > 9223372036854775807 - ln:
        return -1, 0, 0, 0, 0, 0, 0, nxt
    return 1, code, o, ln, t, fs[k], fe[k], nxt


@njit(cache=True, nogil=True)
def _scan(buf, version, op, offset, length, usec, change, status):
    """Parse whole lines of an iolog body into the output arrays. status: requests, first bad line (-1: none),
    file-name changes recorded in ``change`` (request, start, end).

    Each line first meets the fast path: fio's own layout ``[TIME ]FILE ACTION OFFSET LENGTH``, single spaces, the
    previous request's file name, an I/O action, at most 18 digits per number (so no overflow test: 18-digit
    offsets plus 32-bit lengths stay below 2^63). Anything else goes to ``_general_line``, which applies every
    rule. Written out inline with unsigned indices: a function call per number costs this loop half its speed."""
    n = np.uint64(buf.size)
    one = np.uint64(1)
    fs = np.empty(6, np.int64)
    fe = np.empty(6, np.int64)
    nreq = 0
    nchange = 0
    prev_s = np.uint64(0)
    prev_len = np.uint64(0)
    line = 0
    pos = np.uint64(0)
    status[1] = -1
    while pos < n:
        fast = False
        i = pos
        t = 0
        o = 0
        ln = 0
        code = 0
        while True:  # the fast path, once; break leaves it
            if version == 3:
                s = i
                while i < n:
                    d = np.int64(buf[i]) - 48
                    if d < 0 or d > 9:
                        break
                    t = t * 10 + d
                    i += one
                if i == s or i - s > np.uint64(18) or i >= n or buf[i] != 32:
                    break
                i += one
            if prev_len == 0 or i + prev_len + np.uint64(6) >= n or buf[i + prev_len] != 32:
                break
            same = True
            for j in range(prev_len):
                if buf[i + j] != buf[prev_s + j]:
                    same = False
                    break
            if not same:
                break
            i += prev_len + one
            w = (np.int64(buf[i]) | (np.int64(buf[i + one]) << 8) | (np.int64(buf[i + np.uint64(2)]) << 16)
                 | (np.int64(buf[i + np.uint64(3)]) << 24))
            c4 = buf[i + np.uint64(4)]
            if w == _W_READ and c4 == 32:
                code = 0
            elif w == _W_WRIT and c4 == 101 and buf[i + np.uint64(5)] == 32:
                code = 1
                i += one
            elif w == _W_TRIM and c4 == 32:
                code = 2
            elif w == _W_SYNC and c4 == 32:
                code = 3
            else:
                break
            i += np.uint64(5)
            s = i
            while i < n:
                d = np.int64(buf[i]) - 48
                if d < 0 or d > 9:
                    break
                o = o * 10 + d
                i += one
            if i == s or i - s > np.uint64(18) or i >= n or buf[i] != 32:
                break
            i += one
            s = i
            while i < n:
                d = np.int64(buf[i]) - 48
                if d < 0 or d > 9:
                    break
                ln = ln * 10 + d
                i += one
            if i == s or i - s > np.uint64(18):
                break
            if i < n and buf[i] == 13:
                i += one
            if i < n and buf[i] != 10:
                break
            if code == 3:
                ln = 0
            elif ln <= 0 or ln > 4294967295:
                break
            fast = True
            pos = i + one
            break
        if not fast:
            kind, code, o, ln, t, s, e, nxt = _general_line(buf, np.int64(pos), np.int64(n), version, fs, fe)
            if kind < 0:
                status[1] = line
                break
            if kind == 0:
                code = -1
            else:
                same = e - s == np.int64(prev_len)
                if same:
                    for j in range(prev_len):
                        if buf[s + j] != buf[prev_s + j]:
                            same = False
                            break
                if not same:
                    change[nchange, 0] = nreq
                    change[nchange, 1] = s
                    change[nchange, 2] = e
                    nchange += 1
                    prev_s = np.uint64(s)
                    prev_len = np.uint64(e - s)
            pos = np.uint64(nxt)
        if code >= 0:
            op[nreq] = code
            offset[nreq] = o
            length[nreq] = ln
            if version == 3:
                usec[nreq] = t
            nreq += 1
        line += 1
    status[0] = nreq
    status[2] = nchange


def line_problem(fields: list[str], version: int) -> str | None:
    """What is wrong with one iolog line (its fields), or None if it is a good line: the plain reference the scan
    agrees with."""
    want = 5 if version == 3 else 4
    shape = ("TIME " if version == 3 else "") + "FILE ACTION [OFFSET LENGTH]"
    if not fields:
        return None
    action = fields[want - 3] if len(fields) > want - 3 else ""
    if len(fields) == want - 1 and action in IO_ACTIONS:
        return f"{action} needs an offset and a length"
    if len(fields) not in (want - 2, want):
        return f"expected {shape}, found {len(fields)} fields"
    if version == 3 and whole_number(fields[0]) is None:
        return f"timestamp {shorten(fields[0])} is not a whole number of microseconds"
    if action not in ALL_ACTIONS:
        return f"unknown action {shorten(action)}"
    if len(fields) != want:
        return f"{action} needs an offset and a length" if action in IO_ACTIONS else None
    for name, value in (("offset", fields[-2]), ("length", fields[-1])):
        if not is_ascii_digits(value.removeprefix("-")):
            return f"{name} {shorten(value)} is not a whole number"
    if action not in IO_ACTIONS:
        return None
    offset, length = (None if v.startswith("-") else whole_number(v) for v in fields[-2:])
    if offset is None:
        return f"offset {bare(fields[-2])} is not a byte offset (expected a whole number from 0 to 2^63 - 1)"
    if IO_ACTIONS[action] == FLUSH:
        return None
    if length is None or not 1 <= length <= MAX_LENGTH:
        return f"length {bare(fields[-1])} is not valid (expected 1 to {MAX_LENGTH} bytes)"
    if offset + length > MAX_INT64:
        return f"the request ends at byte {offset + length}, beyond 2^63 - 1 (QEMU's limit for a disk)"
    return None


def _pick_file(path: str, chunks: list[_Chunk], files: set[str], file: str | None) -> Trace:
    if file is None and len(files) > 1:
        raise QsimError(f"{path}: the log names {len(files)} files ({', '.join(sorted(files))}); choose one with "
                        "--file")
    if file is not None and file not in files:
        raise QsimError(f"{path}: --file {file!r} is not in the log (it names: {', '.join(sorted(files)) or 'none'})")
    kept = []
    for chunk in chunks:
        if chunk.file_ids is None:
            if file is None or file in chunk.names:
                kept.append(chunk.trace)
        elif file in chunk.names:
            kept.append(chunk.trace.select(chunk.file_ids == chunk.names.index(file)))
    return replace(concat(kept), source=path)


def write_iolog(trace: Trace, path: str, file: str = "/dev/vda") -> None:
    """Write fio iolog v3 that ``fio --read_iolog`` replays (times become microseconds; 0 when unknown)."""
    import pandas as pd

    names = np.array(["read", "write", "trim", "sync"])
    usec = np.zeros(len(trace), dtype=np.int64) if trace.time is None else np.round(trace.time * 1e6).astype(np.int64)
    frame = pd.DataFrame({"t": usec, "f": file, "a": names[trace.op], "o": trace.offset, "l": trace.length})
    last = int(usec[-1]) if len(usec) else 0
    with atomic_output(path) as raw:
        out = _text_out(raw, path)
        try:
            out.write(f"fio version 3 iolog\n0 {file} add\n0 {file} open\n")
            frame.to_csv(out, sep=" ", header=False, index=False, lineterminator="\n")
            out.write(f"{last} {file} close\n")
        finally:
            out.close()


def _text_out(raw, path: str):
    import gzip
    import io

    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6), encoding="utf-8",
                                newline="\n")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
