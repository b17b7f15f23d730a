"""The numba scanners against plain Python references, line by line, on generated text (valid, malformed and in
between): the same requests where the reference accepts every line, the same first bad line where it does not."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsim.errors import QsimError
from qsim.trace import FLUSH
from qsim.traceio import csvfmt, iolog
from qsim.traceio.textfile import Block, split_fields

IO_OPS = {"read": 0, "write": 1, "trim": 2, "sync": 3, "datasync": 3}
CSV_OPS = csvfmt.OP_SPELLINGS


def block_of(text: bytes) -> Block:
    data = np.frombuffer(bytearray(text), dtype=np.uint8)
    return Block(2, data, text.count(b"\n"))


def plain_iolog(text: bytes, version: int):
    """The reference: each line split on spaces and tabs, judged by iolog.line_problem, values by int()."""
    out = []
    for number, raw in enumerate(text.split(b"\n"), start=2):
        line = raw.decode("utf-8", errors="replace").removesuffix("\r")
        fields = split_fields(line)
        if iolog.line_problem(fields, version):
            return number, out
        if len(fields) == (5 if version == 3 else 4) and fields[-3] in IO_OPS:
            op = IO_OPS[fields[-3]]
            seconds = int(fields[0]) / 1e6 if version == 3 else 0.0
            out.append((op, int(fields[-2]), 0 if op == FLUSH else int(fields[-1]), seconds))
    return None, out


def plain_csv(text: bytes, roles):
    out = []
    for number, raw in enumerate(text.split(b"\n"), start=2):
        line = raw.decode("utf-8", errors="replace").removesuffix("\r")
        if csvfmt.row_problem(line, roles):
            return number, out
        if not line.strip(" \t"):
            continue
        column = {int(r): v for r, v in zip(roles, csvfmt.split_row(line))}
        op = CSV_OPS[column[0].lower()]
        offset, length = (0, 0) if op == FLUSH else (int(column[1].partition(".")[0]), int(column[2].partition(".")[0]))
        out.append((op, offset, length, float(column[3]) if 3 in column else 0.0))
    return None, out


NUMBERS = st.one_of(
    st.integers(0, 2**40).map(str), st.integers(0, 2**32 + 5).map(str),
    st.sampled_from(["0", "-0", "-1", "4096", "00012", "9223372036854775807", "9223372036854775808",
                     "9223372036854771712", "99999999999999999999", "4294967295", "4294967296", "1.5", "12x", "",
                     "１２", "٣", "1e3", "+5", "4096.0", "4096.", " 7", "0x10", "\x00", "nan"]))
ACTIONS = st.sampled_from(["read", "write", "trim", "sync", "datasync", "add", "open", "close", "wait", "READ",
                           "rea\x00d", "writ", "frob", "r\xffad", "syncx"])
FILES = st.sampled_from(["/dev/vda", "/dev/vda", "disk.img", "f", "x\xff", "a b"])
SEPARATORS = st.sampled_from([" ", " ", " ", "  ", "\t", " \t"])


@st.composite
def iolog_lines(draw, version):
    lines = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.integers(0, 9))
        fields = [draw(NUMBERS)] if version == 3 else []
        fields += [draw(FILES), draw(ACTIONS)]
        if kind < 7:
            fields += [draw(NUMBERS), draw(NUMBERS)]
        if kind == 8:
            fields.append(draw(NUMBERS))
        if kind == 9 and draw(st.booleans()):
            fields = []
        sep = draw(SEPARATORS)
        line = sep.join(fields) + draw(st.sampled_from(["", "", "\r", " "]))
        if draw(st.integers(0, 20)) == 0:
            line = sep + line
        lines.append(line)
    return "\n".join(lines).encode("utf-8", errors="surrogateescape")


@settings(max_examples=250, deadline=None)
@given(st.sampled_from([2, 3]).flatmap(lambda v: st.tuples(st.just(v), iolog_lines(v))))
def test_iolog_scan_agrees_with_the_reference(case):
    version, text = case
    bad, expected = plain_iolog(text, version)
    try:
        chunk = iolog.parse_block("t.iolog", block_of(text), version, iolog.new_scratch())
    except QsimError as exc:
        assert bad is not None, (text, str(exc))
        assert str(exc).startswith(f"t.iolog: line {bad}: "), (text, str(exc))
        assert "cannot be read" not in str(exc)
        return
    assert bad is None, (text, bad)
    got = [] if chunk is None else list(zip(chunk.trace.op.tolist(), chunk.trace.offset.tolist(),
                                            chunk.trace.length.tolist(),
                                            [0.0] * len(chunk.trace) if version == 2 else chunk.trace.time.tolist()))
    assert got == expected, text


def test_iolog_file_changes_are_tracked_per_request():
    text = b"0 a read 0 4096\n0 b read 4096 4096\n0 b write 0 512\n0 a read 8192 4096\n0 a add\n"
    chunk = iolog.parse_block("t.iolog", block_of(text), 3, iolog.new_scratch())
    assert chunk.names == ["a", "b"] and chunk.file_ids.tolist() == [0, 1, 1, 0]


CSV_OPS_TEXT = st.sampled_from(["read", "write", "flush", "discard", "trim", "sync", "r", "W", "Read", "FLUSH",
                                "munch", "", '"read"', "re\x00ad", "ｒｅａｄ", " read ", '"re""ad"'])
TIMES = st.one_of(st.floats(-1e6, 1e6, allow_nan=False).map(repr), st.sampled_from(
    ["0.5", "1e-3", "1E5", ".5", "5.", "-0.25", "nan", "inf", "", "1e400", "0.30000000000000004",
     "123456789012345678901", "1e", "1.2.3", "１"]))


@st.composite
def csv_case(draw):
    columns = draw(st.sampled_from([["op", "offset", "length"], ["op", "offset", "length", "time"],
                                    ["op", "length", "offset"], ["op", "offset", "length", "note"],
                                    ["op", "time", "offset", "length"]]))
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        values = {"op": draw(CSV_OPS_TEXT), "offset": draw(NUMBERS), "length": draw(NUMBERS), "time": draw(TIMES),
                  "note": draw(st.sampled_from(["x", '"a,b"', '"unclosed', ""]))}
        fields = [values[c] for c in columns]
        shape = draw(st.integers(0, 12))
        if shape == 0:
            fields = fields[:-1]
        elif shape == 1:
            fields.append("7")
        row = ",".join(fields) + draw(st.sampled_from(["", "", "\r", " "]))
        rows.append("" if shape == 2 else row)
    return ",".join(columns), "\n".join(rows).encode("utf-8", errors="surrogateescape")


@settings(max_examples=250, deadline=None)
@given(csv_case())
def test_csv_scan_agrees_with_the_reference(case):
    header, text = case
    roles, has_time = csvfmt.header_roles("t.csv", header)
    bad, expected = plain_csv(text, roles)
    try:
        trace = csvfmt.parse_block("t.csv", block_of(text), roles, has_time, csvfmt.new_scratch())
    except QsimError as exc:
        assert bad is not None, (text, str(exc))
        assert str(exc).startswith(f"t.csv: line {bad}: "), (text, str(exc))
        assert "cannot be read" not in str(exc)
        return
    assert bad is None, (text, bad)
    got = list(zip(trace.op.tolist(), trace.offset.tolist(), trace.length.tolist(),
                   trace.time.tolist() if has_time else [0.0] * len(trace)))
    assert got == expected, text


@pytest.mark.parametrize("text", ["0.1", "0.30000000000000004", "1e22", "1e23", "123456789.123456789", "5e-324",
                                  "1.7976931348623157e308", "-0.0", "9007199254740993", "0.000001"])
def test_csv_times_round_exactly_like_python(text):
    roles, _ = csvfmt.header_roles("t.csv", "op,offset,length,time")
    trace = csvfmt.parse_block("t.csv", block_of(f"read,0,4096,{text}\n".encode()), roles, True,
                               csvfmt.new_scratch())
    assert trace.time.tolist() == [float(text)]
