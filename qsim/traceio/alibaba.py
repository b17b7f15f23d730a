"""Alibaba block traces (2020, the cloud block storage traces): ``device_id,opcode,offset,length,timestamp``.

opcode ``R`` or ``W``, offset and length bytes, timestamp microseconds. No header line in the published files (the
documented one is accepted); often shipped zstd-compressed. ``--volume DEVICE_ID`` keeps one device.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from ..trace import READ, WRITE, Trace
from . import streams

NAMES = ("device_id", "opcode", "offset", "length", "timestamp")
DTYPES = {"device_id": "int64", "opcode": "category", "offset": "int64", "length": "int64", "timestamp": "int64"}
LINE = re.compile(r"\d+,[RWrw],\d+,\d+,\d+")
TICK_SECONDS = 1e-6
OPS = {"R": READ, "W": WRITE}
PROBLEM = streams.field_problem(5, [
    ("device_id", streams.is_count, "a device number"), ("opcode", lambda s: s.upper() in OPS, "R or W"),
    ("offset", streams.is_count, "a byte offset"), ("length", streams.is_count, "a length in bytes"),
    ("timestamp", streams.is_count, "microseconds (a whole number)")])


def looks_like_alibaba(lines: list[str]) -> bool:
    return streams.looks_like(lines, NAMES, LINE)


def raw_chunks(path: str) -> Iterator[streams.Raw]:
    def convert(frame, first_line):
        where = np.arange(first_line, first_line + len(frame), dtype=np.int64)
        op = streams.op_codes(path, frame["opcode"], where, OPS, "R or W")
        raw = streams.Raw(op, frame["offset"].to_numpy(), frame["length"].to_numpy(),
                          frame["timestamp"].to_numpy(), frame["device_id"].to_numpy(), where)
        streams.check_columns(path, where, raw.offset, raw.length)
        return raw

    return streams.csv_raws(path, "an Alibaba block trace", NAMES, DTYPES, convert, PROBLEM)


def parse_volume(text: str) -> int:
    return streams.whole_number_volume(text, "an Alibaba volume is a device_id")


def iter_alibaba(path: str, volume: str | None = None) -> Iterator[Trace]:
    return streams.select(path, raw_chunks(path), volume, "--volume", TICK_SECONDS, str, parse_volume)


def survey_alibaba(path: str) -> list[dict]:
    return streams.survey(raw_chunks(path))
