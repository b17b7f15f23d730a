"""CSV traces: a header ``op,offset,length[,time]``; op is read/write/discard/flush (also r/w/d/f, trim, sync)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import QsimError
from ..trace import DISCARD, FLUSH, OP_NAMES, READ, WRITE, Trace
from .textfile import open_binary

OP_SPELLINGS = {
    "read": READ, "r": READ, "write": WRITE, "w": WRITE, "discard": DISCARD, "trim": DISCARD, "d": DISCARD,
    "flush": FLUSH, "sync": FLUSH, "f": FLUSH,
}
REQUIRED = ("op", "offset", "length")


def read_csv_trace(path: str) -> Trace:
    try:
        with open_binary(path) as stream:
            frame = pd.read_csv(stream, skipinitialspace=True, skip_blank_lines=False, dtype={"op": "category"})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise QsimError(f"{path}: not a CSV trace ({str(exc).strip()})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise QsimError(f"{path}: line 1: the CSV header must name op,offset,length[,time]; missing "
                        f"{', '.join(missing)} (found {', '.join(frame.columns)})")
    op_text = frame["op"].astype(str).str.strip().str.lower()
    op = op_text.map(OP_SPELLINGS)
    if op.isna().any():
        k = int(np.argmax(op.isna().to_numpy()))
        raise QsimError(f"{path}: line {k + 2}: unknown op {frame['op'].iloc[k]!r} (expected read, write, discard "
                        "or flush)")
    op = op.to_numpy(dtype=np.uint8)
    offset = _whole_numbers(frame["offset"], path, "offset", allow_missing=op == FLUSH)
    length = _whole_numbers(frame["length"], path, "length", allow_missing=op == FLUSH)
    io = op != FLUSH
    bad = (offset < 0) & io
    if bad.any():
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {k + 2}: offset {offset[k]} is negative")
    bad = io & ((length <= 0) | (length > 2**32 - 1))
    if bad.any():
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {k + 2}: length {length[k]} is not valid (expected 1 to 4294967295 bytes)")
    time = None
    if "time" in frame.columns:
        time = pd.to_numeric(frame["time"], errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(time).any():
            k = int(np.argmax(np.isnan(time)))
            raise QsimError(f"{path}: line {k + 2}: time {frame['time'].iloc[k]!r} is not a number of seconds")
    return Trace.from_arrays(op, np.where(io, offset, 0), np.where(io, length, 0), time, path)


def _whole_numbers(column: pd.Series, path: str, name: str, allow_missing=None) -> np.ndarray:
    values = pd.to_numeric(column, errors="coerce")
    array = values.to_numpy(dtype=np.float64)
    bad = np.isnan(array) | (array != np.floor(array)) | (np.abs(array) >= 2**53)
    if allow_missing is not None:
        bad &= ~(allow_missing & np.isnan(array))
    if bad.any():
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {k + 2}: {name} {column.iloc[k]!r} is not a whole number of bytes")
    return np.nan_to_num(array).astype(np.int64)


def write_csv_trace(trace: Trace, path: str) -> None:
    frame = trace.to_frame()
    frame["op"] = np.array(OP_NAMES)[trace.op]
    frame.to_csv(path, index=False, lineterminator="\n")
