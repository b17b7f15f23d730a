"""blkparse's default text output: ``MAJ,MIN CPU SEQ SEC.NSEC PID ACTION RWBS SECTOR + NSECT [COMM]``.

One action is kept (default Q, the request as queued); sectors are 512 bytes; RWBS decides the op (D discard,
W write, R read, a bare F flush); summary and other lines are skipped. A line of the kept action whose numbers are
not ASCII whole numbers, or whose request does not fit (sector x 512 + length beyond 2^63 - 1, a length of 4 GiB or
more), is an error naming the line. Read in blocks of lines, so memory stays bounded whatever the file's size.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import QsimError
from ..trace import DISCARD, FLUSH, READ, WRITE, Trace
from .textfile import MAX_INT64, line_blocks, shorten

SECTOR_BYTES = 512
LINE = re.compile(
    r"^\s*(?P<dev>\d+,\d+)\s+(?P<cpu>\d+)\s+(?P<seq>\d+)\s+(?P<time>\d+\.\d+)\s+(?P<pid>\d+)\s+(?P<action>[A-Z]+)"
    r"\s+(?P<rwbs>[A-Z]+)(?:\s+(?P<sector>\d+)\s+\+\s+(?P<nsect>\d+))?(?P<tail>.*)"
)
ACTIONS = set("QGIDCMFABXSTPUR") | {"UT", "BS", "m"}
NUMBERS = ("dev", "cpu", "seq", "time", "pid", "sector", "nsect")
MAX_SECTOR_DIGITS = 19
BLOCK_BYTES = 1 << 20  # pandas holds several objects per line of a block: keep blocks small


def looks_like_blkparse(lines: list[str]) -> bool:
    return any(LINE.match(line) for line in lines)


def read_blkparse(path: str, action: str = "Q") -> Trace:
    from ..trace import concat

    return concat(list(iter_blkparse(path, action)))


def iter_blkparse(path: str, action: str = "Q"):
    """The kept requests in chunks, a block of text at a time; times are seconds since the first kept line."""
    if action not in ACTIONS:
        raise QsimError(f"--action {action!r}: not a blktrace action (Q, G, I, D, C, ...)", 2)
    import pandas as pd

    start_time = None
    found = False
    for first_line, block, _ in line_blocks(path, BLOCK_BYTES):
        lines = pd.Series(block.tobytes().decode("utf-8", errors="replace").splitlines())
        fields = lines.str.extract(LINE)
        keep = (fields["action"] == action).to_numpy()
        if not keep.any():
            continue
        found = True
        fields = fields[keep]
        number = np.flatnonzero(keep) + first_line
        if block.max() >= 128:  # \d matched other scripts' digits only if there is anything but ASCII
            _check_ascii(path, fields, number)
        _check_fields(path, fields, number)
        trace, start_time = _requests(path, fields, number, start_time)
        if len(trace):
            yield trace
    if not found:
        raise QsimError(f"{path}: no blkparse lines with action {action} (is it blkparse text output?)")


def _check_ascii(path: str, fields, number: np.ndarray) -> None:
    """Every number ASCII (the pattern's \\d also matches other scripts' digits)."""
    for name in NUMBERS:
        column = fields[name]
        present = column.notna().to_numpy()
        bad = present & ~column.fillna("0").map(str.isascii).to_numpy(dtype=bool)
        if bad.any():
            k = int(np.argmax(bad))
            raise QsimError(f"{path}: line {number[k]}: {name} {shorten(column.iloc[k])} is not written in ASCII "
                            "digits")


def _check_fields(path: str, fields, number: np.ndarray) -> None:
    """Sectors that fit int64, and no sector-like text that the pattern could not read."""
    long = fields["sector"].fillna("").str.len().to_numpy() > MAX_SECTOR_DIGITS
    long |= fields["nsect"].fillna("").str.len().to_numpy() > MAX_SECTOR_DIGITS
    if long.any():
        k = int(np.argmax(long))
        raise QsimError(f"{path}: line {number[k]}: sector {shorten(fields['sector'].iloc[k])} + "
                        f"{shorten(fields['nsect'].iloc[k])} is beyond any disk (the limit is 2^63 - 1 bytes)")
    # (blkparse prints a completion without sectors as "0 [0]": a number but no '+', which is not a stray sector)
    stray = fields["sector"].isna().to_numpy() & fields["tail"].str.match(r"\s*\S*\s*\+").to_numpy(dtype=bool)
    if stray.any():
        k = int(np.argmax(stray))
        raise QsimError(f"{path}: line {number[k]}: expected SECTOR + NSECT after the RWBS field, found "
                        f"{shorten(fields['tail'].iloc[k].strip())}")


def _requests(path: str, fields, number: np.ndarray, start_time: float | None) -> tuple[Trace, float | None]:
    rwbs = fields["rwbs"].astype(str)
    has_sector = fields["sector"].notna().to_numpy()
    op = np.full(len(fields), 255, dtype=np.uint8)
    op[rwbs.str.contains("R").to_numpy()] = READ
    op[rwbs.str.contains("W").to_numpy()] = WRITE
    op[rwbs.str.contains("D").to_numpy()] = DISCARD
    sector = fields["sector"].fillna("0").to_numpy().astype(np.uint64)  # at most 19 digits: fits
    nsect = fields["nsect"].fillna("0").to_numpy().astype(np.uint64)
    flush = rwbs.str.startswith("F").to_numpy() & ((~has_sector) | (nsect == 0))
    op[flush] = FLUSH
    usable = (op != 255) & (has_sector | flush) & ((nsect > 0) | flush)
    io = usable & ~flush
    limit = np.uint64(MAX_INT64 // SECTOR_BYTES)
    bad = io & ((sector > limit) | (nsect > limit) | (sector + np.minimum(nsect, limit) > limit))
    if bad.any():
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {number[k]}: sector {sector[k]} + {nsect[k]} ends beyond 2^63 - 1 bytes "
                        "(QEMU's limit for a disk)")
    bad = io & (nsect * np.uint64(SECTOR_BYTES) > np.uint64(2**32 - 1))
    if bad.any():
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {number[k]}: {nsect[k]} sectors is 4 GiB or more, beyond one request's "
                        "length")
    time = fields["time"].astype(np.float64).to_numpy()
    if not np.isfinite(time).all():
        k = int(np.argmax(~np.isfinite(time)))
        raise QsimError(f"{path}: line {number[k]}: time {shorten(fields['time'].iloc[k])} is not a number")
    if start_time is None and usable.any():
        start_time = float(time[usable][0])
    offset = np.where(flush, 0, sector * np.uint64(SECTOR_BYTES)).astype(np.int64)
    length = np.where(flush, 0, nsect * np.uint64(SECTOR_BYTES)).astype(np.uint32)
    trace = Trace(op[usable], offset[usable], length[usable], time[usable] - (start_time or 0.0), path)
    return trace, start_time
