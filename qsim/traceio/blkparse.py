"""blkparse's default text output: ``MAJ,MIN CPU SEQ SEC.NSEC PID ACTION RWBS SECTOR + NSECT [COMM]``.

One action is kept (default Q, the request as queued); sectors are 512 bytes; RWBS decides the op (D discard,
W write, R read, a bare F flush); summary and other lines are skipped.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..errors import QsimError
from ..trace import DISCARD, FLUSH, READ, WRITE, Trace
from .textfile import open_binary

SECTOR_BYTES = 512
LINE = re.compile(
    r"^\s*(?P<dev>\d+,\d+)\s+(?P<cpu>\d+)\s+(?P<seq>\d+)\s+(?P<time>\d+\.\d+)\s+(?P<pid>\d+)\s+(?P<action>[A-Z]+)"
    r"\s+(?P<rwbs>[A-Z]+)(?:\s+(?P<sector>\d+)\s+\+\s+(?P<nsect>\d+))?"
)
ACTIONS = set("QGIDCMFABXSTPUR") | {"UT", "BS", "m"}


def looks_like_blkparse(lines: list[str]) -> bool:
    return any(LINE.match(line) for line in lines)


def read_blkparse(path: str, action: str = "Q") -> Trace:
    if action not in ACTIONS:
        raise QsimError(f"--action {action!r}: not a blktrace action (Q, G, I, D, C, ...)", 2)
    with open_binary(path) as stream:
        lines = pd.Series(stream.read().decode("utf-8", errors="replace").splitlines())
    fields = lines.str.extract(LINE)
    keep = (fields["action"] == action).to_numpy()
    if not keep.any():
        raise QsimError(f"{path}: no blkparse lines with action {action} (is it blkparse text output?)")
    fields = fields[keep]
    rwbs = fields["rwbs"].astype(str)
    has_sector = fields["sector"].notna().to_numpy()
    op = np.full(len(fields), 255, dtype=np.uint8)
    op[rwbs.str.contains("R").to_numpy()] = READ
    op[rwbs.str.contains("W").to_numpy()] = WRITE
    op[rwbs.str.contains("D").to_numpy()] = DISCARD
    nsect = pd.to_numeric(fields["nsect"]).fillna(0).to_numpy(dtype=np.int64)
    flush = rwbs.str.startswith("F").to_numpy() & ((~has_sector) | (nsect == 0))
    op[flush] = FLUSH
    usable = (op != 255) & (has_sector | flush) & ((nsect > 0) | flush)
    sector = pd.to_numeric(fields["sector"]).fillna(0).to_numpy(dtype=np.int64)
    time = fields["time"].astype(np.float64).to_numpy()
    return Trace.from_arrays(op[usable], sector[usable] * SECTOR_BYTES, nsect[usable] * SECTOR_BYTES,
                             time[usable] - (time[usable][0] if usable.any() else 0), path)
