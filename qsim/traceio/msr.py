"""MSR Cambridge block traces (SNIA IOTTA): ``Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime``.

Timestamp is a Windows filetime (100 ns ticks since 1601), Type ``Read`` or ``Write``, Offset and Size bytes. The
published files have no header line (the documented one is accepted). A volume is a host and a disk, written as
the published file names write it: ``--volume web_1`` is host web, disk 1 (``qsim trace info`` lists them).
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from ..errors import UsageError
from ..trace import READ, WRITE, Trace
from . import streams

NAMES = ("Timestamp", "Hostname", "DiskNumber", "Type", "Offset", "Size", "ResponseTime")
DTYPES = {"Timestamp": "int64", "Hostname": "str", "DiskNumber": "int64", "Type": "category", "Offset": "int64",
          "Size": "int64", "ResponseTime": "int64"}
LINE = re.compile(r"\d+,[^,\s]+,\d+,(?i:read|write),\d+,\d+,\d+")
TICK_SECONDS = 1e-7
OPS = {"read": READ, "write": WRITE}
PROBLEM = streams.field_problem(7, [
    ("Timestamp", streams.is_count, "a filetime (whole number)"), ("Hostname", bool, "a host name"),
    ("DiskNumber", streams.is_count, "a disk number"), ("Type", lambda s: s.lower() in OPS, "Read or Write"),
    ("Offset", streams.is_count, "a byte offset"), ("Size", streams.is_count, "a size in bytes"),
    ("ResponseTime", streams.is_count, "a whole number")])


def looks_like_msr(lines: list[str]) -> bool:
    return streams.looks_like(lines, NAMES, LINE)


def raw_chunks(path: str) -> Iterator[streams.Raw]:
    def convert(frame, first_line):
        where = np.arange(first_line, first_line + len(frame), dtype=np.int64)
        op = streams.op_codes(path, frame["Type"], where, OPS, "Read or Write")
        volume = (frame["Hostname"].astype(str) + "_" + frame["DiskNumber"].astype(str)).to_numpy(dtype=object)
        raw = streams.Raw(op, frame["Offset"].to_numpy(), frame["Size"].to_numpy(),
                          frame["Timestamp"].to_numpy(), volume, where)
        streams.check_columns(path, where, raw.offset, raw.length, ("Offset", "Size"))
        return raw

    return streams.csv_raws(path, "an MSR Cambridge trace", NAMES, DTYPES, convert, PROBLEM)


def parse_volume(text: str) -> str:
    host, sep, disk = str(text).rpartition("_")
    if not sep or not host or not disk.isdigit():
        raise UsageError(f"--volume {text!r}: an MSR volume is HOST_DISK, e.g. web_1 (qsim trace info lists them)")
    return f"{host}_{int(disk)}"


def iter_msr(path: str, volume: str | None = None) -> Iterator[Trace]:
    return streams.select(path, raw_chunks(path), volume, "--volume", TICK_SECONDS, str, parse_volume)


def survey_msr(path: str) -> list[dict]:
    return streams.survey(raw_chunks(path))
