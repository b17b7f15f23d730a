"""The compact binary form: an uncompressed ``.npz`` of the trace's columns, reloaded at memory speed."""

from __future__ import annotations

import zipfile

import numpy as np

from ..errors import QsimError
from ..trace import Trace

FORMAT_TAG = "qsim-trace-1"


def write_npz_trace(trace: Trace, path: str) -> None:
    columns = {"op": trace.op, "offset": trace.offset, "length": trace.length, "format": np.array(FORMAT_TAG)}
    if trace.time is not None:
        columns["time"] = trace.time
    with open(path, "wb") as f:
        np.savez(f, **columns)


def read_npz_trace(path: str) -> Trace:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or str(data["format"]) != FORMAT_TAG:
                raise QsimError(f"{path}: not a qsim binary trace (no '{FORMAT_TAG}' tag)")
            time = data["time"] if "time" in data else None
            return Trace.from_arrays(data["op"], data["offset"], data["length"], time, path)
    except (zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        raise QsimError(f"{path}: damaged binary trace ({exc})") from None
