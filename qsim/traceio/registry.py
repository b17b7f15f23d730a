"""The trace formats beyond qsim's own (QEMU logs, public block traces, binary captures): detection and dispatch.

``qsim.traceio`` asks here first (binary files, which its text sniffing cannot look at) and last (text
formats that have no header to recognise), and hands these formats' reading to the modules named in FORMATS.
"""

from __future__ import annotations

import os
from typing import Iterator

from ..errors import QsimError, UsageError
import numpy as np

from ..trace import Trace
from . import alibaba, blktrace, msr, qemulog, streams, tencent, vscsi
from .textfile import check_readable

FORMATS = ("qemu-log", "vscsi", "blktrace", "msr", "alibaba", "tencent")
SELECTOR = {"qemu-log": "--device", "msr": "--volume", "alibaba": "--volume", "tencent": "--volume"}
TEXT_DETECTORS = (("msr", msr.looks_like_msr), ("alibaba", alibaba.looks_like_alibaba),
                  ("tencent", tencent.looks_like_tencent))
SURVEYS = {"qemu-log": qemulog.survey_qemulog, "msr": msr.survey_msr, "alibaba": alibaba.survey_alibaba,
           "tencent": tencent.survey_tencent}
READERS = {  # (path, action, device, volume, chunk_requests) -> chunks of Trace
    "qemu-log": lambda path, action, device, volume, chunk: qemulog.iter_qemulog(path, device),
    "vscsi": lambda path, action, device, volume, chunk: vscsi.iter_vscsi(path, chunk),
    "blktrace": lambda path, action, device, volume, chunk: blktrace.iter_blktrace(path, action),
    "msr": lambda path, action, device, volume, chunk: msr.iter_msr(path, volume),
    "alibaba": lambda path, action, device, volume, chunk: alibaba.iter_alibaba(path, volume),
    "tencent": lambda path, action, device, volume, chunk: tencent.iter_tencent(path, volume),
}
QEMU_LOG_PROBE = 1 << 20  # a libvirt domain log can start with a long command line and other messages


def detect_first(path: str) -> str | None:
    """Formats to recognise before any text sniffing: blktrace (also NAME for NAME.blktrace.*) and vscsi, plain or
    compressed."""
    if not os.path.exists(path) and blktrace.per_cpu_files(path):
        return "blktrace"
    check_readable(path)
    kind = streams.compression(path)
    head = streams.head_bytes(path, 64 * 1024)
    if blktrace.byte_order(head) is not None:
        return "blktrace"
    if vscsi.vscsi_version(head, os.path.getsize(path) if kind is None else None):
        return "vscsi"
    return None  # text (plain, gzip or zstd): sniffed from its first lines


def detect_last(path: str, lines: list[str]) -> str | None:
    """Text formats without a header of their own, from the first lines (a QEMU log from its first MiB)."""
    for name, looks in TEXT_DETECTORS:
        if looks(lines):
            return name
    if qemulog.looks_like_qemulog(streams.head_bytes(path, QEMU_LOG_PROBE)):
        return "qemu-log"
    return None


def check_selection(path: str, fmt: str, device: str | None, volume: str | None) -> None:
    """--device and --volume apply to the formats that hold several BlockBackends / volumes."""
    for option, value in (("--device", device), ("--volume", volume)):
        if value is not None and SELECTOR.get(fmt) != option:
            where = {"--device": "QEMU trace logs", "--volume": "msr, alibaba and tencent traces"}[option]
            raise UsageError(f"{option}: applies to {where}; {path} is read as {fmt}")


def iter_formats(path: str, fmt: str, action: str = "Q", device: str | None = None, volume: str | None = None,
                 chunk_requests: int = streams.CHUNK_RECORDS) -> Iterator[Trace]:
    check_selection(path, fmt, device, volume)
    if fmt != "blktrace" or os.path.exists(path):
        check_readable(path)
    if fmt in READERS:
        return READERS[fmt](path, action, device, volume, chunk_requests)
    raise QsimError(f"--format {fmt!r}: not one of {', '.join(FORMATS)}", 2)


def read_formats(path: str, fmt: str, action: str = "Q", device: str | None = None,
                 volume: str | None = None) -> Trace:
    """The whole trace. Joined one column at a time, dropping each column's chunks once joined, so the peak is the
    chunks plus one column (about 29 bytes per request), not twice the trace."""
    columns: dict[str, list] = {"op": [], "offset": [], "length": [], "time": []}
    for part in iter_formats(path, fmt, action, device, volume):
        for name, parts in columns.items():
            parts.append(getattr(part, name))
    if not columns["op"]:
        return Trace.from_arrays([], [], [], source=path)
    joined = {}
    for name in ("time", "offset", "length", "op"):
        parts = columns.pop(name)
        joined[name] = None if any(p is None for p in parts) else parts[0] if len(parts) == 1 else \
            np.concatenate(parts)
        del parts
    return Trace(joined["op"], joined["offset"], joined["length"], joined["time"], path)


def survey(path: str, fmt: str) -> list[dict] | None:
    """The volumes (BlockBackends, host disks, devices) a file holds with their request counts, or None for formats
    that hold one."""
    return SURVEYS[fmt](path) if fmt in SURVEYS else None
