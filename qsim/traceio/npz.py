"""The compact binary form: an uncompressed ``.npz`` of the trace's columns, reloaded at memory speed.

A file that claims to be one is checked before it is believed: one-dimensional columns of one length and of
numeric types, op codes 0-3, offsets and lengths whole and non-negative, lengths below 4 GiB, every request ending
at or below 2^63 - 1, finite times. The first bad record is named (``file: record N: ...``).
"""

from __future__ import annotations

import zipfile

import numpy as np

from ..errors import QsimError
from ..safeio import atomic_output
from ..trace import FLUSH, OP_NAMES, Trace
from .textfile import MAX_INT64, check_readable

FORMAT_TAG = "qsim-trace-1"
COLUMNS = ("op", "offset", "length", "time")
MAX_LENGTH = 2**32 - 1


def write_npz_trace(trace: Trace, path: str) -> None:
    columns = {"op": trace.op, "offset": trace.offset, "length": trace.length, "format": np.array(FORMAT_TAG)}
    if trace.time is not None:
        columns["time"] = trace.time
    with atomic_output(path) as f:
        np.savez(f, **columns)


def read_npz_trace(path: str) -> Trace:
    check_readable(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or _tag(data["format"]) != FORMAT_TAG:
                raise QsimError(f"{path}: not a qsim binary trace (no '{FORMAT_TAG}' tag)")
            missing = [c for c in COLUMNS[:3] if c not in data]
            if missing:
                raise QsimError(f"{path}: damaged binary trace (no {', '.join(missing)} column)")
            columns = {c: data[c] for c in COLUMNS if c in data}
    except QsimError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError, NotImplementedError) as exc:
        raise QsimError(f"{path}: damaged binary trace ({str(exc)[:120]})") from None
    except MemoryError:
        raise QsimError(f"{path}: damaged binary trace (its columns claim more memory than there is)") from None
    return _checked(path, columns)


def _range(column: np.ndarray) -> tuple:
    """(smallest, largest) value of a non-empty integer column (an unsigned one's smallest is 0: no pass)."""
    return (column.min() if np.iinfo(column.dtype).min < 0 else 0), column.max()


def _tag(value: np.ndarray) -> str | None:
    ok = isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind == "U"
    return str(value) if ok else None


def _checked(path: str, columns: dict[str, np.ndarray]) -> Trace:
    n = None
    for name, column in columns.items():
        if not isinstance(column, np.ndarray):
            raise QsimError(f"{path}: damaged binary trace (member {name} is not an array)")
        if column.ndim != 1:
            raise QsimError(f"{path}: damaged binary trace (column {name} has shape {column.shape}, not one "
                            "dimension)")
        kinds = "fiu" if name == "time" else "iu"
        if column.dtype.kind not in kinds:
            raise QsimError(f"{path}: damaged binary trace (column {name} holds {column.dtype}, not "
                            f"{'numbers' if name == 'time' else 'whole numbers'})")
        if n is not None and len(column) != n:
            raise QsimError(f"{path}: damaged binary trace (columns of different lengths)")
        n = len(column)
    op, offset, length = columns["op"], columns["offset"], columns["length"]

    def fail(bad: np.ndarray, what: str) -> None:
        if bad.any():
            k = int(np.argmax(bad))
            raise QsimError(f"{path}: record {k + 1}: {what.format(op=op[k], offset=offset[k], length=length[k])}")

    # Each check runs per record only when the column's range says a record could fail it (one min/max pass:
    # a file qsim wrote, with the types it writes, costs no temporaries).
    if n:
        lowest, highest = (int(v) for v in _range(op))
        if lowest < 0 or highest > FLUSH:
            fail((op < 0) | (op > FLUSH), f"op code {{op}} is not one of 0-3 ({', '.join(OP_NAMES)})")
        lowest, highest = (int(v) for v in _range(offset))
        if lowest < 0:
            fail(offset < 0, "offset {offset} is negative")
        if highest > MAX_INT64:
            fail(offset > MAX_INT64, "offset {offset} is beyond 2^63 - 1")
        shortest, longest = (int(v) for v in _range(length))
        if shortest < 0 or longest > MAX_LENGTH:
            fail((length < 0) | (length > MAX_LENGTH), f"length {{length}} is not 0 to {MAX_LENGTH} bytes")
        if highest + longest > MAX_INT64:
            io = op != FLUSH
            room = MAX_INT64 - offset.astype(np.int64)
            fail(io & (length.astype(np.int64) > room), "the request ({offset} + {length}) ends beyond 2^63 - 1")
    time = columns.get("time")
    if time is not None:
        fail(~np.isfinite(time.astype(np.float64)), "time is not a finite number of seconds")
    return Trace.from_arrays(op, offset, length, time, path)
