"""QEMU trace logs (the ``log`` trace backend): the ``blk_co_preadv`` / ``blk_co_pwritev`` lines of BlockBackends.

The line, as QEMU's generated code prints it (scripts/tracetool/backend/log.py; checked against qemu-system 7.2 and
qemu-io / qemu-storage-daemon 7.2 and 10.0):

    8364@1796159650.248230:blk_co_pwritev blk 0x557b1f699310 bs 0x557b1f699660 offset 65536 bytes 65536 flags 0x0

The ``TID@SECONDS.MICROSECONDS:`` prefix is there with ``-msg timestamp=on`` (libvirt passes it to every QEMU) and
absent without it (QEMU before 7.1 always printed it, and ``flags %x`` without ``0x``). Each BlockBackend is
told apart by its ``blk`` pointer: ``--device 0x557b1f699310`` keeps one. Lines of other events and any other text
(libvirt's own lines, QEMU's messages) are skipped; a ``blk_co_p*`` line that does not parse is an error naming
file:line. Write-zeroes requests (flags 0x2) are writes; zero-length requests (format probes, markers) are not
requests and are left out. Flushes and discards have no such event: a QEMU log cannot show them.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from ..errors import QsimError, UsageError
from ..trace import WRITE, Trace
from . import streams

EVENTS = (b"blk_co_preadv", b"blk_co_pwritev")
LINE = re.compile(rb"(?:(\d+)@(\d+)\.(\d{6}):)?blk_co_p(read|write)v blk (0x[0-9a-f]+|\(nil\)) "
                  rb"bs (?:0x[0-9a-f]+|\(nil\)) offset (\d+) bytes (\d+) flags (?:0x)?[0-9a-f]+\r?")
LINE_M = re.compile(rb"^" + LINE.pattern + rb"$", re.MULTILINE)
CANDIDATE = re.compile(rb"(?:\d+@\d+\.\d+:)?blk_co_p(?:read|write)v(?: |\r?$)")
TICK_SECONDS = 1e-6
SHAPE = "[TID@SEC.USEC:]blk_co_preadv|blk_co_pwritev blk PTR bs PTR offset N bytes N flags 0xN"


def looks_like_qemulog(head: bytes) -> bool:
    """Some line of the head is a blk_co_p* trace line (other lines may be anything: it is a log)."""
    return any(LINE.fullmatch(line) for line in head.split(b"\n")[:-1] if b"blk_co_p" in line)


def show_device(key: int) -> str:
    return f"0x{key:x}" if key else "(nil)"


def parse_device(text: str) -> int:
    s = str(text).strip().lower()
    try:
        return 0 if s == "(nil)" else int(s[2:] if s.startswith("0x") else s, 16)
    except ValueError:
        raise UsageError(f"--device {text!r}: expected a BlockBackend pointer such as 0x557b1f699310 "
                         "(qsim trace info LOG lists them)") from None


def raw_chunks(path: str, chunk_bytes: int = 32 << 20, start: int = 0, end: int | None = None,
               first_line: int = 1) -> Iterator[streams.Raw]:
    """The log's requests (of an uncompressed log: bytes start .. end, which begin at line ``first_line``)."""
    timed = None  # whether the log's lines carry timestamps (decided by the first one)
    for first, block in streams.line_blocks(path, chunk_bytes, start, end, first_line):
        lines = block.split(b"\n")
        where = [i for i, line in enumerate(lines) if b"blk_co_p" in line]
        candidates = [lines[i] for i in where]
        found = LINE_M.findall(b"\n".join(candidates))  # the common case: every candidate is a trace line, parsed in C
        if len(found) != len(candidates):
            found, where = _line_by_line(path, first, lines, where)
        if not found:
            continue
        tid, sec, usec, kind, blk, offset, length = (np.array(c) for c in zip(*found))
        has_time = tid != b""
        if timed is None:
            timed = bool(has_time[0])
        mixed = has_time != timed
        if mixed.any():
            k = int(np.argmax(mixed))
            raise QsimError(f"{path}: line {first + where[k]}: a trace line {'without' if timed else 'with'} a "
                            "timestamp among lines " + ("with" if timed else "without") + " (one QEMU run per log, "
                            "please: cut the log where QEMU restarted)")
        length = length.astype(np.int64)
        keep = length > 0  # zero-length requests (format probes, markers) are not requests
        big = length > 2**32 - 1
        if big.any():
            k = int(np.argmax(big))
            raise QsimError(f"{path}: line {first + where[k]}: bytes {length[k]} is larger than qsim's 4 GiB - 1")
        pointers, index = np.unique(blk, return_inverse=True)
        keys = np.array([0 if p == b"(nil)" else int(p, 16) for p in pointers.tolist()], dtype=np.uint64)
        ticks = sec.astype(np.int64) * 1_000_000 + usec.astype(np.int64) if timed else None
        raw = streams.Raw((kind == b"write").astype(np.uint8) * WRITE, offset.astype(np.int64), length,
                          ticks, keys[index.ravel()], np.asarray(where, dtype=np.int64) + first)
        if not keep.all():
            raw = streams.Raw(*(c if c is None else c[keep] for c in raw))
        if len(raw.op):
            yield raw


def _line_by_line(path: str, first: int, lines: list[bytes], where: list[int]) -> tuple[list, list]:
    """The block's trace lines one by one, skipping other text that mentions blk_co_p; a malformed trace line is
    an error naming its line."""
    found, kept = [], []
    for i in where:
        m = LINE.fullmatch(lines[i])
        if m is None:
            if CANDIDATE.match(lines[i]):
                raise _bad(path, first + i, lines[i])
            continue
        found.append(tuple(b"" if g is None else g for g in m.groups()))
        kept.append(i)
    return found, kept


def _bad(path: str, number: int, line: bytes) -> QsimError:
    text = line.decode("utf-8", errors="replace")
    return QsimError(f"{path}: line {number}: malformed {text.partition(' ')[0].rpartition(':')[2]} trace line "
                     f"(expected {SHAPE}): {text[:160]!r}")


def iter_qemulog(path: str, device: str | None = None) -> Iterator[Trace]:
    found = False
    for trace in streams.select(path, raw_chunks(path), device, "--device", TICK_SECONDS, show_device,
                                parse_device):
        found = True
        yield trace
    if not found and device is None:
        raise QsimError(f"{path}: no blk_co_preadv/blk_co_pwritev lines (was QEMU run with -trace 'blk_co_p*', or "
                        "the events switched on with trace-event-set-state, and is this its log?)")


def survey_qemulog(path: str) -> list[dict]:
    return streams.survey(raw_chunks(path), show_device)
