"""blktrace's binary output: ``struct blk_io_trace`` records (include/uapi/linux/blktrace_api.h), per-CPU files.

A record is 48 bytes followed by ``pdu_len`` bytes of payload: u32 magic (0x65617400 | version 0x07), u32
sequence, u64 time (ns), u64 sector (512 bytes), u32 bytes, u32 action, u32 pid, u32 device, u32 cpu, u16 error,
u16 pdu_len, in the byte order of the machine that traced (the magic tells which). ``action``'s low 16 bits are the
action (__BLK_TA_QUEUE = 1 ...), the high 16 bits its category (BLK_TC_READ, WRITE, FLUSH, DISCARD, NOTIFY ...).

As ``blkparse -i NAME`` does, ``NAME`` (or any ``NAME.blktrace.N``) means every per-CPU file ``NAME.blktrace.*``,
merged by (time, device, sequence) as blkparse's sort tree orders them (blkparse's output of exact ties in time
across CPUs, rare at nanoseconds, also depends on how it batches its reads), streamed with bounded memory: each
file is read in chunks and records are handed out once every file has read past their time. One action is kept
(Q by default, the request as queued) and ops follow blkparse's RWBS, as the blkparse text reader does: discard,
else write, else read when there are bytes; a zero-byte flush is a flush, other zero-byte records (and notes:
process names, messages) are skipped. Record boundaries depend on each payload, so one compiled pass walks the
records and writes the kept ones' columns.
"""

from __future__ import annotations

import glob
import re
from typing import Iterator

import numpy as np
from numba import njit

from ..errors import QsimError, UsageError
from ..trace import Trace
from . import streams
from .textfile import open_binary

MAGIC, VERSION = 0x65617400, 0x07
HEADER = 48
FIELDS = [("magic", "u4"), ("sequence", "u4"), ("time", "u8"), ("sector", "u8"), ("bytes", "u4"), ("action", "u4"),
          ("pid", "u4"), ("device", "u4"), ("cpu", "u4"), ("error", "u2"), ("pdu_len", "u2")]
LE = np.dtype([(n, "<" + t) for n, t in FIELDS])
BE = np.dtype([(n, ">" + t) for n, t in FIELDS])
# action codes (low 16 bits) by blkparse's letter
ACTIONS = {"Q": 1, "M": 2, "F": 3, "G": 4, "S": 5, "R": 6, "D": 7, "C": 8, "P": 9, "U": 10, "UT": 11, "I": 12,
           "X": 13, "B": 14, "A": 15}
TC_READ, TC_WRITE, TC_FLUSH, TC_NOTIFY, TC_DISCARD = 1 << 0, 1 << 1, 1 << 2, 1 << 10, 1 << 13
SECTOR = 512
PER_CPU = re.compile(r"^(?P<base>.*)\.blktrace\.(?P<cpu>\d+)$")


def per_cpu_files(path: str) -> list[str]:
    """The per-CPU files ``path`` stands for: NAME.blktrace.* for NAME or NAME.blktrace.N; [] when there are none."""
    m = PER_CPU.match(path)
    base = m.group("base") if m else path
    files = [f for f in glob.glob(glob.escape(base) + ".blktrace.*") if PER_CPU.match(f)]
    return sorted(files, key=lambda f: int(PER_CPU.match(f).group("cpu")))


def byte_order(head: bytes) -> np.dtype | None:
    if len(head) < HEADER:
        return None
    for dtype in (LE, BE):
        magic = int(np.frombuffer(head, dtype=dtype, count=1)["magic"][0])
        if magic & 0xFFFFFF00 == MAGIC:
            return dtype
    return None


@njit(cache=True, inline="always")
def _u32(buf, at, big):
    if big:
        return (np.uint32(buf[at]) << 24) | (np.uint32(buf[at + 1]) << 16) | (np.uint32(buf[at + 2]) << 8) \
            | np.uint32(buf[at + 3])
    return (np.uint32(buf[at + 3]) << 24) | (np.uint32(buf[at + 2]) << 16) | (np.uint32(buf[at + 1]) << 8) \
        | np.uint32(buf[at])


@njit(cache=True, inline="always")
def _u64(buf, at, big):
    if big:
        return (np.uint64(_u32(buf, at, big)) << 32) | np.uint64(_u32(buf, at + 4, big))
    return (np.uint64(_u32(buf, at + 4, big)) << 32) | np.uint64(_u32(buf, at, big))


@njit(cache=True)
def _decode(buf, big, action, op, offset, length, time, device, sequence):
    """Walk the whole records in ``buf`` (48-byte header + pdu_len), keeping those of ``action`` as columns.
    Returns (records walked, kept, bytes used, position of a record without the magic or -1, its version or -1)."""
    pos, n, kept, size = 0, 0, 0, len(buf)
    while pos + 48 <= size:
        magic = _u32(buf, pos, big)
        if magic & 0xFFFFFF00 != 0x65617400:
            return n, kept, pos, pos, -1
        if magic & 0xFF != 0x07:
            return n, kept, pos, pos, magic & 0xFF
        pdu = (np.uint32(buf[pos + 46]) << 8) | np.uint32(buf[pos + 47]) if big else \
            (np.uint32(buf[pos + 47]) << 8) | np.uint32(buf[pos + 46])
        if pos + 48 + pdu > size:
            break
        what = _u32(buf, pos + 28, big)
        category = what >> 16
        if (what & 0xFFFF) == action and (category & 0x400) == 0:  # not a note (BLK_TC_NOTIFY)
            nbytes = _u32(buf, pos + 24, big)
            if nbytes > 0 or (category & 0x4) != 0:
                if nbytes == 0:
                    op[kept] = 3  # FLUSH
                    offset[kept] = 0
                else:
                    op[kept] = 2 if category & 0x2000 else (1 if category & 0x2 else 0)  # DISCARD, WRITE, READ
                    offset[kept] = np.int64(_u64(buf, pos + 16, big)) * 512
                length[kept] = nbytes
                time[kept] = np.int64(_u64(buf, pos + 8, big))
                device[kept] = _u32(buf, pos + 36, big)
                sequence[kept] = _u32(buf, pos + 4, big)
                kept += 1
        n += 1
        pos += 48 + pdu
    return n, kept, pos, -1, -1


class _CpuFile:
    """One per-CPU file read in chunks: the kept records (as columns) not handed out yet."""

    def __init__(self, path: str, action: int, chunk_bytes: int):
        self.path, self.action, self.chunk_bytes = path, action, chunk_bytes
        self.stream = open_binary(path)
        self.buffer = np.empty(chunk_bytes, dtype=np.uint8)  # reused, never zeroed
        self.rest = 0  # bytes at the buffer's start carried over from the last read
        self.position = 0  # file offset of ``rest``
        self.records = 0
        self.done = False
        self.scratch: tuple | None = None
        self.dtype = byte_order(streams.head_bytes(path, HEADER))
        if self.dtype is None:
            raise QsimError(f"{path}: not a blktrace file (no blk_io_trace magic 0x65617407 at byte 0)")
        self.columns: dict[str, np.ndarray] = {k: np.empty(0, dtype=t) for k, t in
                                                (("time", np.int64), ("device", np.uint32),
                                                 ("sequence", np.uint32), ("op", np.uint8), ("offset", np.int64),
                                                 ("length", np.uint32))}

    @property
    def last_time(self) -> int:
        return int(self.columns["time"][-1]) if len(self.columns["time"]) else -1

    def read_more(self) -> None:
        """Read the next chunk; at the end of the file, ``done``."""
        got = streams.read_into(self.path, self.stream, self.buffer[self.rest:])
        if not got:
            self.done = True
            self.stream.close()
            if self.rest:
                raise QsimError(f"{self.path}: record {self.records + 1} (byte {self.position}): the file ends inside "
                                f"a record ({self.rest} bytes; truncated?)")
            return
        buf = self.buffer[:self.rest + got]
        m = len(buf) // HEADER
        if self.scratch is None or len(self.scratch[0]) < m:  # reused: fresh columns cost page faults every chunk
            self.scratch = (np.empty(m, np.uint8), np.empty(m, np.int64), np.empty(m, np.uint32),
                            np.empty(m, np.int64), np.empty(m, np.uint32), np.empty(m, np.uint32))
        cols = self.scratch
        n, kept, used, bad, version = _decode(buf, self.dtype is BE, self.action, *cols)
        if bad >= 0 and version < 0:
            raise QsimError(f"{self.path}: record {self.records + n + 1} (byte {self.position + bad}): no "
                            "blk_io_trace magic (damaged file, or not blktrace output)")
        if bad >= 0:
            raise QsimError(f"{self.path}: record {self.records + n + 1}: blktrace version {version}, qsim reads "
                            f"version {VERSION} (blktrace 1.x)")
        self.rest = len(buf) - used
        if self.rest > len(self.buffer) // 2:  # a record whose payload does not fit: grow the buffer
            self.buffer = np.concatenate([self.buffer, np.empty(len(self.buffer), dtype=np.uint8)])
        self.buffer[:self.rest] = buf[used:]  # the start of a record cut by the chunk's end, kept for the next read
        self.position += used
        self.records += n
        new = dict(zip(("op", "offset", "length", "time", "device", "sequence"), (c[:kept] for c in cols)))
        for k, v in new.items():
            self.columns[k] = np.concatenate([self.columns[k], v]) if len(self.columns[k]) else v.copy()

    def take_before(self, horizon: int | None) -> dict[str, np.ndarray]:
        """Hand out the records with time < horizon (all of them when None)."""
        t = self.columns["time"]
        cut = len(t) if horizon is None else int(np.searchsorted(t, horizon, "left"))
        out = {k: v[:cut] for k, v in self.columns.items()}
        self.columns = {k: v[cut:] for k, v in self.columns.items()}
        return out


def iter_blktrace(path: str, action: str = "Q", chunk_bytes: int = 16 << 20) -> Iterator[Trace]:
    code = ACTIONS.get(action)
    if code is None:
        raise UsageError(f"--action {action!r}: not a blktrace action ({', '.join(ACTIONS)})")
    files = per_cpu_files(path) or [path]
    cpus = [_CpuFile(f, code, chunk_bytes) for f in files]
    t0 = None
    while True:
        live = [c for c in cpus if not c.done]
        if live:
            # read from the file that lags: its last time bounds what can be handed out
            lagging = min(live, key=lambda c: c.last_time)
            lagging.read_more()
            live = [c for c in cpus if not c.done]
        horizon = min(c.last_time for c in live) if live else None
        if horizon is not None and horizon < 0:
            continue  # some file has read nothing kept yet
        parts = [c.take_before(horizon) for c in cpus]
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if len(merged["time"]):
            order = np.argsort(merged["time"], kind="stable")  # the per-file runs are sorted: a linear merge
            times = merged["time"][order]
            if len(cpus) > 1 and (times[1:] == times[:-1]).any():  # exact ties: blkparse's full order
                order = np.lexsort((merged["sequence"], merged["device"], merged["time"]))
            if t0 is None:
                t0 = int(merged["time"][order[0]])
            yield Trace(merged["op"][order], merged["offset"][order], merged["length"][order],
                        (merged["time"][order] - t0) * 1e-9, path)
        if not live:
            return
