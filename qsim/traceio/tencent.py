"""Tencent CBS block traces (SNIA IOTTA, 2018): ``Timestamp,Offset,Size,IOType,VolumeID``.

Timestamp seconds, Offset and Size 512-byte sectors, IOType 0 = read and 1 = write. No header line in the published
files (the documented one is accepted); often shipped zstd-compressed. ``--volume VOLUMEID`` keeps one volume.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from ..errors import QsimError
from ..trace import READ, WRITE, Trace
from . import streams

NAMES = ("Timestamp", "Offset", "Size", "IOType", "VolumeID")
DTYPES = {name: "int64" for name in NAMES}
LINE = re.compile(r"\d+,\d+,\d+,[01],\d+")
SECTOR = 512
PROBLEM = streams.field_problem(5, [
    ("Timestamp", streams.is_count, "seconds (a whole number)"), ("Offset", streams.is_count, "a sector number"),
    ("Size", streams.is_count, "a number of sectors"), ("IOType", lambda s: s in ("0", "1"), "0 (read) or 1 (write)"),
    ("VolumeID", streams.is_count, "a volume number")])


def looks_like_tencent(lines: list[str]) -> bool:
    return streams.looks_like(lines, NAMES, LINE)


def raw_chunks(path: str) -> Iterator[streams.Raw]:
    def convert(frame, first_line):
        where = np.arange(first_line, first_line + len(frame), dtype=np.int64)
        kind = frame["IOType"].to_numpy()
        bad = (kind != 0) & (kind != 1)
        if bad.any():
            k = int(np.argmax(bad))
            raise QsimError(f"{path}: line {where[k]}: IOType {kind[k]} is not 0 (read) or 1 (write)")
        op = np.where(kind == 1, WRITE, READ).astype(np.uint8)
        offset, size = frame["Offset"].to_numpy(), frame["Size"].to_numpy()
        streams.check_columns(path, where, offset, size * SECTOR, ("Offset", "Size in bytes"))
        return streams.Raw(op, offset * SECTOR, size * SECTOR, frame["Timestamp"].to_numpy(),
                           frame["VolumeID"].to_numpy(), where)

    return streams.csv_raws(path, "a Tencent CBS trace", NAMES, DTYPES, convert, PROBLEM)


def parse_volume(text: str) -> int:
    return streams.whole_number_volume(text, "a Tencent volume is a VolumeID")


def iter_tencent(path: str, volume: str | None = None) -> Iterator[Trace]:
    return streams.select(path, raw_chunks(path), volume, "--volume", 1.0, str, parse_volume)


def survey_tencent(path: str) -> list[dict]:
    return streams.survey(raw_chunks(path))
