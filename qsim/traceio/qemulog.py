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
from ..trace import READ, WRITE, Trace
from . import streams

EVENTS = (b"blk_co_preadv", b"blk_co_pwritev")
LINE = re.compile(rb"(?:(\d+)@(\d+)\.(\d{6}):)?blk_co_p(read|write)v blk (0x[0-9a-f]+|\(nil\)) "
                  rb"bs (?:0x[0-9a-f]+|\(nil\)) offset (\d+) bytes (\d+) flags (?:0x)?[0-9a-f]+\r?")
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
    for first_line, block in streams.line_blocks(path, chunk_bytes, start, end, first_line):
        lines = block.split(b"\n")
        ops, offsets, lengths, ticks, keys, where = [], [], [], [], [], []
        for i in [i for i, line in enumerate(lines) if b"blk_co_p" in line]:
            line = lines[i]
            m = LINE.fullmatch(line)
            if m is None:
                if CANDIDATE.match(line):
                    raise _bad(path, first_line + i, line)
                continue
            tid, sec, usec, kind, blk, offset, length = m.groups()
            if timed is None:
                timed = tid is not None
            elif timed != (tid is not None):
                raise QsimError(f"{path}: line {first_line + i}: a trace line {'without' if timed else 'with'} a "
                                "timestamp among lines " + ("with" if timed else "without") + " (one QEMU run per "
                                "log, please: cut the log where QEMU restarted)")
            n = int(length)
            if n == 0:
                continue
            ops.append(WRITE if kind == b"write" else READ)
            offsets.append(int(offset))
            lengths.append(n)
            if timed:
                ticks.append(int(sec) * 1_000_000 + int(usec))
            keys.append(0 if blk == b"(nil)" else int(blk, 16))
            where.append(first_line + i)
        if ops:
            if max(lengths) > 2**32 - 1:
                k = int(np.argmax(np.array(lengths) > 2**32 - 1))
                raise QsimError(f"{path}: line {where[k]}: bytes {lengths[k]} is larger than qsim's 4 GiB - 1")
            yield streams.Raw(np.array(ops, dtype=np.uint8), np.array(offsets, dtype=np.int64),
                              np.array(lengths, dtype=np.int64), np.array(ticks, dtype=np.int64) if timed else None,
                              np.array(keys, dtype=np.uint64), np.array(where, dtype=np.int64))


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
