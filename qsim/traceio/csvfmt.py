"""CSV traces: a header ``op,offset,length[,time]`` (op first, other columns in any order, extra columns ignored);
op is read/write/discard/flush (also r/w/d/f, trim, sync, any case). Offsets and lengths are whole numbers of
bytes (``4096.0`` too, as pandas writes a column with gaps); a flush may leave them empty. Fields may be quoted.
Blank lines are skipped; every other line must have the header's field count.

Parsing is a numba scan over the bytes in blocks, like the iolog reader; ``row_problem`` is the plain reference for
one line that explains the first line the scan rejects (the tests check the two agree).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..errors import QsimError
from ..safeio import atomic_output
from ..trace import DISCARD, FLUSH, OP_NAMES, READ, WRITE, Trace
from .textfile import MAX_INT64, Block, Scratch, bare, line_blocks, line_text, shorten, skip_first_line, whole_number

OP_SPELLINGS = {
    "read": READ, "r": READ, "write": WRITE, "w": WRITE, "discard": DISCARD, "trim": DISCARD, "d": DISCARD,
    "flush": FLUSH, "sync": FLUSH, "f": FLUSH,
}
REQUIRED = ("op", "offset", "length")
ROLES = {"op": 0, "offset": 1, "length": 2, "time": 3}
MAX_LENGTH = 2**32 - 1
# op spellings packed little-endian into integers (all at most 8 bytes), with their op code
_OP_WORDS = np.array([int.from_bytes(k.encode(), "little") for k in OP_SPELLINGS], dtype=np.int64)
_OP_CODES = np.array(list(OP_SPELLINGS.values()), dtype=np.uint8)
_POW10 = np.array([10.0**k for k in range(23)])  # exact in binary64


def read_csv_trace(path: str) -> Trace:
    from ..trace import concat

    chunks = list(iter_csv_trace(path))
    return concat(chunks) if chunks else Trace.from_arrays([], [], [], None, path)


def iter_csv_trace(path: str):
    """The trace in chunks of a block of text each (bounded memory whatever the file's size)."""
    roles = None
    has_time = False
    scratch = new_scratch()
    for block in line_blocks(path):
        if roles is None:
            roles, has_time = header_roles(path, line_text(block.data, 0))
            block = skip_first_line(block)
        if block.data.size:
            trace = parse_block(path, block, roles, has_time, scratch)
            if len(trace):
                yield trace
    if roles is None:
        raise QsimError(f"{path}: empty file, not a CSV trace")


def header_roles(path: str, text: str) -> tuple[np.ndarray, bool]:
    fields = split_row(text)
    names = [f.strip().lower() for f in fields] if fields is not None else []
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        found = ", ".join(shorten(n, 20) for n in names[:10])
        raise QsimError(f"{path}: line 1: the CSV header must name op,offset,length[,time]; missing "
                        f"{', '.join(missing)} (found {found})")
    for name in ROLES:
        if names.count(name) > 1:
            raise QsimError(f"{path}: line 1: the CSV header names {name} twice")
    return np.array([ROLES.get(n, -1) for n in names], dtype=np.int64), "time" in names


def new_scratch() -> Scratch:
    return Scratch(op=(np.uint8, ()), offset=(np.int64, ()), length=(np.uint32, ()), time=(np.float64, ()),
                   slow=(np.int64, (4,)))


def parse_block(path: str, block: Block, roles: np.ndarray, has_time: bool, scratch: Scratch) -> Trace:
    """The requests of a block of whole lines (the header excluded), or QsimError naming the first bad line."""
    a = scratch.get(block.newlines + 1)
    status = np.zeros(3, np.int64)
    _scan(block.data, roles, _OP_WORDS, _OP_CODES, _POW10, a["op"], a["offset"], a["length"], a["time"], a["slow"],
          status, has_time)
    n, bad_line, n_slow = (int(v) for v in status)
    time = a["time"][:n].copy() if has_time else None
    if n_slow:  # all on lines before the scan's first bad line, if any
        slow_bad = _slow_times(block.data, time, a["slow"][:n_slow])
        bad_line = slow_bad if slow_bad >= 0 else bad_line
    if bad_line >= 0:
        text = line_text(block.data, bad_line)
        problem = row_problem(text, roles) or "cannot be read as a CSV trace line"
        raise QsimError(f"{path}: line {block.first_line + bad_line}: {problem}")
    return Trace(a["op"][:n].copy(), a["offset"][:n].copy(), a["length"][:n].copy(), time, path)


def _slow_times(block: np.ndarray, time: np.ndarray, slow: np.ndarray) -> int:
    """Times the scan could not convert exactly by itself (many digits, large exponents): Python's float(), which
    rounds correctly. The first line with a time that is not finite, or -1."""
    data = block.tobytes()
    for request, line, s, e in slow.tolist():
        value = float(data[s:e])
        if not math.isfinite(value):
            return line
        time[request] = value
    return -1


@njit(cache=True, nogil=True)
def _strip(buf, s, e):
    while s < e and (buf[s] == 32 or buf[s] == 9):
        s += 1
    while e > s and (buf[e - 1] == 32 or buf[e - 1] == 9):
        e -= 1
    return s, e


@njit(cache=True, nogil=True)
def _whole(buf, s, e):
    """``-?[0-9]+(\\.0*)?`` as int64: the value; -1 not a whole number (or beyond INT64_MAX); -2 negative (any
    leading '-', "-0" too); -3 empty."""
    if s >= e:
        return -3
    negative = buf[s] == 45
    if negative:
        s += 1
    if s >= e or buf[s] < 48 or buf[s] > 57:
        return -1
    value = 0
    big = False
    i = s
    while i < e and 48 <= buf[i] <= 57:
        d = np.int64(buf[i]) - 48
        if i - s < 18:  # 18 digits cannot overflow: no division on the common path
            value = value * 10 + d
        elif value > (9223372036854775807 - d) // 10:
            big = True
        else:
            value = value * 10 + d
        i += 1
    if i < e:
        if buf[i] != 46:
            return -1
        i += 1
        while i < e:
            if buf[i] != 48:
                return -1
            i += 1
    if negative:
        return -2
    return -1 if big else value


@njit(cache=True, nogil=True)
def _seconds(buf, s, e, pow10):
    """``[+-]?(D+(.D*)?|.D+)([eE][+-]?D+)?`` -> (ok, exact, value). ``exact`` False: valid, but leave the
    conversion to Python (more than 2^53 in the digits or a power of ten beyond 10^22)."""
    i = s
    negative = False
    if i < e and (buf[i] == 43 or buf[i] == 45):
        negative = buf[i] == 45
        i += 1
    mantissa = 0
    exact = True
    digits = 0
    scale = 0
    while i < e and 48 <= buf[i] <= 57:
        if mantissa < 900719925474099:
            mantissa = mantissa * 10 + (buf[i] - 48)
        else:
            exact = False
        digits += 1
        i += 1
    if i < e and buf[i] == 46:
        i += 1
        while i < e and 48 <= buf[i] <= 57:
            if mantissa < 900719925474099:
                mantissa = mantissa * 10 + (buf[i] - 48)
                scale -= 1
            elif buf[i] != 48:
                exact = False
            digits += 1
            i += 1
    if digits == 0:
        return False, False, 0.0
    if i < e and (buf[i] == 101 or buf[i] == 69):
        i += 1
        sign = 1
        if i < e and (buf[i] == 43 or buf[i] == 45):
            sign = -1 if buf[i] == 45 else 1
            i += 1
        if i >= e:
            return False, False, 0.0
        power = 0
        while i < e and 48 <= buf[i] <= 57:
            if power < 100000:
                power = power * 10 + (buf[i] - 48)
            i += 1
        scale += sign * power
    if i != e:
        return False, False, 0.0
    value = float(mantissa)
    if mantissa == 0:
        value = 0.0
    elif 0 <= scale <= 22:
        value *= pow10[scale]
    elif -22 <= scale < 0:
        value /= pow10[-scale]
    else:
        exact = False
    return True, exact, -value if negative else value


@njit(cache=True, nogil=True)
def _general_row(buf, pos, n, roles, words, codes, pow10, fs, fe):
    """Any line, by the rules of ``row_problem``: (kind, op, offset, length, time, time exact, time field start,
    end, next line's start); kind 0 a blank line, 1 a request, -1 a bad line."""
    ncols = roles.size
    end = pos
    while end < n and buf[end] != 10:
        end += 1
    nxt = end + 1
    stop = end - 1 if end > pos and buf[end - 1] == 13 else end
    blank = True
    for i in range(pos, stop):
        if buf[i] != 32 and buf[i] != 9:
            blank = False
            break
    if blank:
        return 0, 0, 0, 0, 0.0, True, 0, 0, nxt
    nf = 0
    i = pos
    while True:  # one field per turn
        while i < stop and (buf[i] == 32 or buf[i] == 9):
            i += 1
        if i < stop and buf[i] == 34:  # quoted
            i += 1
            s = i
            while i < stop:
                if buf[i] == 34:
                    if i + 1 < stop and buf[i + 1] == 34:
                        i += 2
                        continue
                    break
                i += 1
            if i >= stop:
                return -1, 0, 0, 0, 0.0, True, 0, 0, nxt
            f_end = i
            i += 1
            while i < stop and (buf[i] == 32 or buf[i] == 9):
                i += 1
            if i < stop and buf[i] != 44:
                return -1, 0, 0, 0, 0.0, True, 0, 0, nxt
        else:
            s = i
            while i < stop and buf[i] != 44:
                i += 1
            f_end = i
        if nf < ncols:
            fs[nf], fe[nf] = _strip(buf, s, f_end)
        nf += 1
        if i < stop:  # at a comma
            i += 1
        else:
            break
    if nf != ncols:
        return -1, 0, 0, 0, 0.0, True, 0, 0, nxt
    code = 255
    for j in range(ncols):
        if roles[j] == 0:
            code = _op_code(buf, fs[j], fe[j], words, codes, True)
    if code == 255:
        return -1, 0, 0, 0, 0.0, True, 0, 0, nxt
    o = 0
    ln = 0
    t = 0.0
    exact = True
    ts = 0
    te = 0
    for j in range(ncols):
        r = roles[j]
        if r == 1 or r == 2:
            v = _whole(buf, fs[j], fe[j])
            if code == 3:
                if v == -1:
                    return -1, 0, 0, 0, 0.0, True, 0, 0, nxt
            elif v < 0:
                return -1, 0, 0, 0, 0.0, True, 0, 0, nxt
            elif r == 1:
                o = v
            else:
                ln = v
        elif r == 3:
            ok, exact, t = _seconds(buf, fs[j], fe[j], pow10)
            if not ok:
                return -1, 0, 0, 0, 0.0, True, 0, 0, nxt
            ts = fs[j]
            te = fe[j]
    if code != 3 and (ln <= 0 or ln > 4294967295 or o > 9223372036854775807 - ln):
        return -1, 0, 0, 0, 0.0, True, 0, 0, nxt
    return 1, code, o, ln, t, exact, ts, te, nxt


@njit(cache=True, nogil=True)
def _op_code(buf, s, e, words, codes, fold):
    """The op code of buf[s:e] (``fold``: in any case), 255 if it is no spelling of an op."""
    if e - s <= 0 or e - s > 8:
        return 255
    w = 0
    for k in range(e - 1, s - 1, -1):
        c = buf[k]
        if fold and 65 <= c <= 90:
            c += 32
        w = (w << 8) | c
    for k in range(words.size):
        if words[k] == w:
            return codes[k]
    return 255


@njit(cache=True, nogil=True)
def _scan(buf, roles, words, codes, pow10, op, offset, length, time, slow, status, has_time):
    """Parse whole CSV lines into the output arrays. status: requests, first bad line (-1: none), slow times.

    The fast path takes what qsim and pandas write when the columns are op,offset,length[,time]: a lowercase op,
    bare digits (at most 18: no overflow), nothing else; the rest goes to ``_general_row``."""
    n = np.uint64(buf.size)
    one = np.uint64(1)
    comma = np.uint8(44)
    layout = roles.size >= 3 and roles[0] == 0 and roles[1] == 1 and roles[2] == 2 and (
        roles.size == 3 or (roles.size == 4 and roles[3] == 3))
    fs = np.empty(roles.size, np.int64)
    fe = np.empty(roles.size, np.int64)
    nreq = 0
    nslow = 0
    line = 0
    pos = np.uint64(0)
    status[1] = -1
    while pos < n:
        fast = False
        code = 255
        o = 0
        ln = 0
        t = 0.0
        while layout:  # the fast path, once; break leaves it
            i = pos
            while i < n and buf[i] != comma and i - pos < np.uint64(8):
                i += one
            if i >= n or buf[i] != comma:
                break
            code = _op_code(buf, np.int64(pos), np.int64(i), words, codes, False)
            if code == 255:
                break
            i += one
            s = i
            while i < n:
                d = np.int64(buf[i]) - 48
                if d < 0 or d > 9:
                    break
                o = o * 10 + d
                i += one
            if i == s or i - s > np.uint64(18) or i >= n or buf[i] != comma:
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
            if has_time:
                if i >= n or buf[i] != comma:
                    break
                i += one
                s = i
                while i < n and buf[i] != 10 and buf[i] != 13:
                    i += one
                ok, exact, t = _seconds(buf, np.int64(s), np.int64(i), pow10)
                if not ok or not exact:
                    break
            if i < n and buf[i] == 13:
                i += one
            if i < n and buf[i] != 10:
                break
            if code == 3:
                o = 0
                ln = 0
            elif ln <= 0 or ln > 4294967295:
                break
            fast = True
            pos = i + one
            break
        if not fast:
            kind, code, o, ln, t, exact, ts, te, nxt = _general_row(buf, np.int64(pos), np.int64(n), roles, words,
                                                                   codes, pow10, fs, fe)
            if kind < 0:
                status[1] = line
                break
            if kind == 0:
                code = 255
            elif code == 3:
                o = 0
                ln = 0
            if kind == 1 and not exact:
                slow[nslow, 0] = nreq
                slow[nslow, 1] = line
                slow[nslow, 2] = ts
                slow[nslow, 3] = te
                nslow += 1
            pos = np.uint64(nxt)
        if code != 255:
            op[nreq] = code
            offset[nreq] = o
            length[nreq] = ln
            if has_time:
                time[nreq] = t
            nreq += 1
        line += 1
    status[0] = nreq
    status[2] = nslow


_FLOAT_CHARS = set("0123456789+-.eE")


def split_row(text: str) -> list[str] | None:
    """The fields of one CSV line as the scan reads them (quotes removed, surrounding spaces and tabs stripped), or
    None for a malformed quoted field."""
    fields, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            j = i + 1
            while j < n and not (text[j] == '"' and text[j + 1:j + 2] != '"'):
                j += 2 if text[j] == '"' else 1
            if j >= n:
                return None
            value, i = text[i + 1:j], j + 1
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] != ",":
                return None
        else:
            j = text.find(",", i)
            j = n if j < 0 else j
            value, i = text[i:j], j
        fields.append(value.strip(" \t"))
        if i >= n:
            return fields
        i += 1


def row_problem(text: str, roles: np.ndarray) -> str | None:
    """What is wrong with one CSV line (the header's roles give each column's meaning), or None: the plain
    reference the scan agrees with."""
    if not text.strip(" \t"):
        return None
    fields = split_row(text)
    if fields is None:
        return "a quoted field is not closed (or has text after its closing quote)"
    if len(fields) != len(roles):
        return f"expected {len(roles)} fields like the header, found {len(fields)}"
    column = {int(r): fields[j] for j, r in enumerate(roles) if r >= 0}
    op = OP_SPELLINGS.get(column[0].lower()) if column[0].isascii() else None
    if op is None:
        return f"unknown op {shorten(column[0])} (expected read, write, discard or flush)"
    values = {}
    for role, name in ((1, "offset"), (2, "length")):
        value = column[role]
        whole = _whole_text(value)
        if op == FLUSH and (value == "" or whole is not None):
            continue
        if value == "":
            return f"{name} is missing (only a flush may leave it empty)"
        if whole is None:
            return f"{name} {shorten(value)} is not a whole number of bytes"
        values[name] = whole
    if op != FLUSH:
        if values["offset"] < 0:
            return f"offset {bare(column[1])} is negative"
        if not 1 <= values["length"] <= MAX_LENGTH:
            return f"length {bare(column[2])} is not valid (expected 1 to {MAX_LENGTH} bytes)"
        if values["offset"] + values["length"] > MAX_INT64:
            return "the request ends beyond byte 2^63 - 1 (QEMU's limit for a disk)"
    if 3 in column:
        value = column[3]
        ok = bool(value) and set(value) <= _FLOAT_CHARS and _is_float(value)
        if not ok or not math.isfinite(float(value)):
            return f"time {shorten(value)} is not a number of seconds"
    return None


def _whole_text(value: str) -> int | None:
    """The reference for ``_whole``: ``-?[0-9]+(\\.0*)?`` as an int within int64 (-1 for any negative one, "-0"
    included); None otherwise."""
    sign = value.startswith("-")
    digits, dot, zeros = value[sign:].partition(".")
    if not (digits.isascii() and digits.isdigit()) or (dot and zeros.strip("0")):
        return None
    if sign:
        return -1
    return whole_number(digits)


def _is_float(value: str) -> bool:
    import re

    return re.fullmatch(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?", value) is not None


def write_csv_trace(trace: Trace, path: str) -> None:
    frame = trace.to_frame()
    frame["op"] = np.array(OP_NAMES)[trace.op]
    with atomic_output(path, binary=False) as out:
        frame.to_csv(out, index=False, lineterminator="\n")
