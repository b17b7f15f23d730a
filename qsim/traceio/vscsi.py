"""CloudPhysics vscsi binary traces (VMware vscsiStats), versions 1 and 2, as libCacheSim reads them.

v1 records are 32 bytes: u32 sn, u32 len, u32 nSG, u16 cmd, u16 ver, u64 lbn, u64 ts; v2 records 40 bytes:
u16 cmd, u16 ver, u32 sn, u32 len, u32 nSG, u64 lbn, u64 ts, u64 rt (little-endian). ``ver >> 8`` is the version
(that is how the file is recognised), ``lbn`` counts 512-byte sectors, ``len`` bytes, ``ts`` microseconds. ``cmd``
is the SCSI opcode: READ(6/10/12/16) are reads, WRITE(6/10/12/16) writes, SYNCHRONIZE CACHE(10/16) flushes; other
commands (INQUIRY, UNMAP, ...) carry no data extent in the record and are left out, like zero-length transfers.
Parsed with numpy structured dtypes straight from the file's bytes, in chunks.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import QsimError
from ..trace import FLUSH, READ, WRITE, Trace
from . import streams

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


def iter_vscsi(path: str, chunk_records: int = streams.CHUNK_RECORDS) -> Iterator[Trace]:
    version = vscsi_version(streams.head_bytes(path, 40 * PROBE_RECORDS), None)  # a cut file: say so below
    if version is None:
        raise QsimError(f"{path}: not a vscsi trace (record 1's version field is neither v1 nor v2)")
    dtype = LAYOUTS[version]
    t0, first = None, 0
    with streams.open_stream(path) as f:
        while True:
            data = streams.read_exactly(f, chunk_records * dtype.itemsize)
            whole = len(data) - len(data) % dtype.itemsize
            records, tail = np.frombuffer(data, dtype=dtype, count=whole // dtype.itemsize), data[whole:]
            if tail:
                raise QsimError(f"{path}: record {first + len(records) + 1}: the file ends inside a record "
                                f"({len(tail)} of {dtype.itemsize} bytes; truncated?)")
            if not len(records):
                return
            bad = (records["ver"] >> 8) != version
            if bad.any():
                k = int(np.argmax(bad))
                raise QsimError(f"{path}: record {first + k + 1} (byte {(first + k) * dtype.itemsize}): version field "
                                f"0x{int(records['ver'][k]):04x} is not vscsi v{version} (damaged file?)")
            op = OP_OF_CMD[records["cmd"]]
            length = records["len"]
            keep = (op != 255) & ((length > 0) | (op == FLUSH))
            if not keep.all():
                records, op, length = records[keep], op[keep], length[keep]
            lbn = records["lbn"]
            if len(lbn) and int(lbn.max()) >= (1 << 54):
                k = int(np.argmax(lbn >= (1 << 54)))
                raise QsimError(f"{path}: record {first + int(np.flatnonzero(keep)[k]) + 1}: lbn {int(lbn[k])} is "
                                "beyond any disk")
            ts = records["ts"]
            if len(ts):
                if t0 is None:
                    t0 = int(ts[0])
                time = (ts.astype(np.int64) - t0) * 1e-6
                io = op != FLUSH
                offset = lbn.astype(np.int64) * SECTOR
                if not io.all():
                    offset[~io] = 0
                    length = np.where(io, length, 0).astype(np.uint32)
                yield Trace(op, offset, np.ascontiguousarray(length, dtype=np.uint32), time, path)
            first += len(keep)
