"""CloudPhysics vscsi binary traces (VMware vscsiStats), versions 1 and 2, as libCacheSim reads them.

v1 records are 32 bytes: u32 sn, u32 len, u32 nSG, u16 cmd, u16 ver, u64 lbn, u64 ts; v2 records 40 bytes:
u16 cmd, u16 ver, u32 sn, u32 len, u32 nSG, u64 lbn, u64 ts, u64 rt (little-endian). ``ver >> 8`` is the version
(that is how the file is recognised), ``lbn`` counts 512-byte sectors, ``len`` bytes, ``ts`` microseconds. ``cmd``
is the SCSI opcode: READ(6/10/12/16) are reads, WRITE(6/10/12/16) writes, SYNCHRONIZE CACHE(10/16) flushes; other
commands (INQUIRY, UNMAP, ...) carry no data extent in the record and are left out, like zero-length transfers.
Read in chunks into one reused buffer, viewed as a numpy structured array and converted in one compiled pass.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from numba import njit

from ..errors import QsimError
from ..trace import FLUSH, READ, WRITE, Trace
from . import streams
from .textfile import open_binary

V1 = np.dtype([("sn", "<u4"), ("len", "<u4"), ("nSG", "<u4"), ("cmd", "<u2"), ("ver", "<u2"), ("lbn", "<u8"),
               ("ts", "<u8")])
V2 = np.dtype([("cmd", "<u2"), ("ver", "<u2"), ("sn", "<u4"), ("len", "<u4"), ("nSG", "<u4"), ("lbn", "<u8"),
               ("ts", "<u8"), ("rt", "<u8")])
LAYOUTS = {1: V1, 2: V2}
OP_OF_CMD = np.full(1 << 16, 255, dtype=np.uint8)
OP_OF_CMD[[0x08, 0x28, 0xA8, 0x88]] = READ
OP_OF_CMD[[0x0A, 0x2A, 0xAA, 0x8A]] = WRITE
OP_OF_CMD[[0x35, 0x91]] = FLUSH
SECTOR = 512
PROBE_RECORDS = 16
FLUSH_CODE = FLUSH
LBN_LIMIT = 1 << 54


def vscsi_version(head: bytes, file_size: int | None) -> int | None:
    """2 or 1 when the first records' ``ver`` fields say so (and the size is whole records), else None."""
    for version in (2, 1):
        dtype = LAYOUTS[version]
        n = min(len(head) // dtype.itemsize, PROBE_RECORDS)
        if n < 1 or (file_size is not None and file_size % dtype.itemsize):
            continue
        records = np.frombuffer(head, dtype=dtype, count=n)
        if ((records["ver"] >> 8) == version).all() and (OP_OF_CMD[records["cmd"]] != 255).any():
            return version
    return None


@njit(cache=True)
def _decode(records, version, lut, t0, op, offset, length, time):
    """One pass over the records: keep reads, writes and flushes (with data, or flushes), converted. Returns the
    number kept, or -(index + 1) of the first record whose version field is wrong, or -(len + 1) - index for an lbn
    beyond any disk."""
    n = 0
    for i in range(len(records)):
        r = records[i]
        if (r.ver >> 8) != version:
            return -(i + 1)
        kind = lut[r.cmd]
        if kind == 255 or (r.len == 0 and kind != FLUSH_CODE):
            continue
        if r.lbn >= LBN_LIMIT:
            return -(len(records) + 1) - i
        op[n] = kind
        if kind == FLUSH_CODE:
            offset[n] = 0
            length[n] = 0
        else:
            offset[n] = np.int64(r.lbn) * SECTOR
            length[n] = r.len
        time[n] = (np.int64(r.ts) - t0) * 1e-6
        n += 1
    return n


def iter_vscsi(path: str, chunk_records: int = streams.CHUNK_RECORDS) -> Iterator[Trace]:
    version = vscsi_version(streams.head_bytes(path, 40 * PROBE_RECORDS), None)  # a cut file: say so below
    if version is None:
        raise QsimError(f"{path}: not a vscsi trace (record 1's version field is neither v1 nor v2)")
    dtype = LAYOUTS[version]
    t0, first = None, 0
    buffer = np.empty(chunk_records * dtype.itemsize, dtype=np.uint8)  # reused, never zeroed
    with open_binary(path) as f:
        while True:
            got = streams.read_into(path, f, buffer)
            whole = got - got % dtype.itemsize
            if got > whole:
                raise QsimError(f"{path}: record {first + whole // dtype.itemsize + 1}: the file ends inside a "
                                f"record ({got - whole} of {dtype.itemsize} bytes; truncated?)")
            if not whole:
                return
            records = np.frombuffer(buffer, dtype=dtype, count=whole // dtype.itemsize)
            if t0 is None:
                t0 = int(records["ts"][0])
            m = len(records)
            op, length = np.empty(m, np.uint8), np.empty(m, np.uint32)
            offset, time = np.empty(m, np.int64), np.empty(m, np.float64)
            n = _decode(records, version, OP_OF_CMD, t0, op, offset, length, time)
            if n < -m:
                k = -(n + m + 1)
                raise QsimError(f"{path}: record {first + k + 1}: lbn {int(records['lbn'][k])} is beyond any disk")
            if n < 0:
                k = -n - 1
                raise QsimError(f"{path}: record {first + k + 1} (byte {(first + k) * dtype.itemsize}): version field "
                                f"0x{int(records['ver'][k]):04x} is not vscsi v{version} (damaged file?)")
            if n:
                yield Trace(op[:n], offset[:n], length[:n], time[:n], path)
            first += m
