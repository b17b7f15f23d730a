"""Alibaba block traces (2020, the cloud block storage traces): ``device_id,opcode,offset,length,timestamp``.

opcode ``R`` or ``W``, offset and length bytes, timestamp microseconds. No header line in the published files (the
documented one is accepted); often shipped zstd-compressed. ``--volume DEVICE_ID`` keeps one device.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from ..errors import QsimError, UsageError
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
    body = [line.strip() for line in lines if line.strip()]
    if body and body[0].lower().replace(" ", "") == ",".join(NAMES):
        return True
    return bool(body) and all(LINE.fullmatch(line) for line in body[:10])


def raw_chunks(path: str) -> Iterator[streams.Raw]:
    def convert(frame, first_line):
        where = np.arange(first_line, first_line + len(frame), dtype=np.int64)
        op = frame["opcode"].astype(str).str.upper().map(OPS)
        if op.isna().any():
            k = int(np.argmax(op.isna().to_numpy()))
            raise QsimError(f"{path}: line {where[k]}: opcode {frame['opcode'].iloc[k]!r} is not R or W")
        raw = streams.Raw(op.to_numpy(dtype=np.uint8), frame["offset"].to_numpy(), frame["length"].to_numpy(),
                          frame["timestamp"].to_numpy(), frame["device_id"].to_numpy(), where)
        streams.check_columns(path, where, raw.offset, raw.length)
        return raw

    return streams.csv_raws(path, "an Alibaba block trace", NAMES, DTYPES, convert, PROBLEM)


def parse_volume(text: str) -> int:
    if not str(text).strip().isdigit():
        raise UsageError(f"--volume {text!r}: an Alibaba volume is a device_id (a whole number)")
    return int(text)


def iter_alibaba(path: str, volume: str | None = None) -> Iterator[Trace]:
    return streams.select(path, raw_chunks(path), volume, "--volume", TICK_SECONDS, str, parse_volume)


def survey_alibaba(path: str) -> list[dict]:
    return streams.survey(raw_chunks(path))
