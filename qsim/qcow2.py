"""Read real qcow2 images, read-only: header (v2/v3) and extensions, L1, every L2 table, refcounts.

Whole tables are decoded at once with numpy big-endian views. Every offset and size from the file is checked
before it is used (a hostile header cannot make qsim allocate more than the file holds or read outside it); problems
are QsimErrors naming the structure and the offset. The file is opened read-only and never locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import QsimError
from .geometry import MAX_L1_BYTES, ImageGeometry

MAGIC = b"QFI\xfb"
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = (1 << i for i in range(5))
KNOWN_INCOMPAT = 0x1F
EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_ENCRYPTION, EXT_DATA_FILE = (
    0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77, 0x44415441)
QEMU_LOCK_BYTES = (100, 300)  # file-posix's permission lock bytes (RAW_LOCK_PERM_BASE .. SHARED_BASE + 100)
F_OFD_GETLK = 36


@dataclass(frozen=True)
class Header:
    """Header fields as stored, plus what the extensions say."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict = field(default_factory=dict)
    extensions: tuple = ()

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order


@dataclass(frozen=True, eq=False)
class Qcow2Image:
    """Everything read from one image file. Arrays: ``l1`` uint64 entries; ``l2_tables`` int64 L1 index of each
    allocated table (in L1 order); ``l2_descriptors`` uint64 [tables, entries]; ``l2_bitmaps`` uint64 [tables,
    entries] (extended_l2) or None; ``refcounts`` int64 per host cluster of the file (0 beyond covered blocks)."""

    path: str
    file_bytes: int
    header: Header
    l1: np.ndarray
    l2_tables: np.ndarray
    l2_descriptors: np.ndarray
    l2_bitmaps: np.ndarray | None
    refcounts: np.ndarray
    refblock_present: np.ndarray
    warnings: tuple[str, ...]

    @property
    def geometry(self) -> ImageGeometry:
        h = self.header
        return ImageGeometry(h.size, h.cluster_size, h.extended_l2, h.refcount_bits)


class _Reader:
    def __init__(self, path: str):
        self.path = path
        try:
            self.f = open(path, "rb")  # read-only, always
        except FileNotFoundError:
            raise QsimError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise QsimError(f"{path}: is a directory, not an image") from None
        except PermissionError:
            raise QsimError(f"{path}: permission denied") from None
        self.size = os.fstat(self.f.fileno()).st_size

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise QsimError(f"{self.path}: {what} at offset {offset:#x} ({length} bytes) lies beyond the end of the "
                            f"file ({self.size} bytes): truncated or damaged image")
        self.f.seek(offset)
        data = self.f.read(length)
        if len(data) != length:
            raise QsimError(f"{self.path}: short read of {what} at offset {offset:#x}")
        return data

    def close(self) -> None:
        self.f.close()


def _parse_header(r: _Reader) -> Header:
    if r.size < 72:
        raise QsimError(f"{r.path}: {r.size} bytes is too short for a qcow2 header")
    raw = r.read(0, min(r.size, 4096), "header")
    bits = struct.unpack(">I", raw[20:24])[0]
    if raw[:4] == MAGIC and 12 < bits <= 21:
        raw = r.read(0, min(r.size, 1 << bits), "header cluster")
    if raw[:4] != MAGIC:
        raise QsimError(f"{r.path}: not a qcow2 image (magic {raw[:4]!r} at offset 0, expected {MAGIC!r})")
    fields = struct.unpack(">IIQIIQIIQQIIQ", raw[:72])
    version = fields[1]
    if version not in (2, 3):
        raise QsimError(f"{r.path}: qcow2 version {version} is not supported (2 or 3)")
    h = dict(version=version, backing_file_offset=fields[2], backing_file_size=fields[3], cluster_bits=fields[4],
             size=fields[5], crypt_method=fields[6], l1_size=fields[7], l1_table_offset=fields[8],
             refcount_table_offset=fields[9], refcount_table_clusters=fields[10], nb_snapshots=fields[11],
             snapshots_offset=fields[12])
    if version == 3:
        if len(raw) < 104:
            raise QsimError(f"{r.path}: truncated version 3 header")
        inc, comp, auto, order, hlen = struct.unpack(">QQQII", raw[72:104])
        h.update(incompatible_features=inc, compatible_features=comp, autoclear_features=auto, refcount_order=order,
                 header_length=hlen)
        if hlen < 104 or hlen > len(raw):
            raise QsimError(f"{r.path}: header_length {hlen} at offset 0x64 is impossible")
        if hlen > 104:
            h["compression_type"] = raw[104]
    if not 9 <= h["cluster_bits"] <= 21:
        raise QsimError(f"{r.path}: cluster_bits {h['cluster_bits']} at offset 0x14 is outside 9..21")
    if h.get("refcount_order", 4) > 6:
        raise QsimError(f"{r.path}: refcount_order {h['refcount_order']} at offset 0x60 is above 6 (64 bits)")
    if h["size"] >= 1 << 63:
        raise QsimError(f"{r.path}: virtual size {h['size']} at offset 0x18 is absurd")
    extensions, names = [], {}
    start = h.get("header_length", 72) if version == 3 else 72
    end = h["backing_file_offset"] if h["backing_file_offset"] else len(raw)
    pos = start
    while version == 3 and pos + 8 <= min(end, len(raw)):
        kind, length = struct.unpack(">II", raw[pos:pos + 8])
        if kind == 0:
            break
        data = raw[pos + 8: pos + 8 + length]
        if len(data) != length:
            raise QsimError(f"{r.path}: header extension {kind:#x} at offset {pos:#x} runs past the header")
        extensions.append(kind)
        if kind == EXT_BACKING_FORMAT:
            h["backing_format"] = data.decode("utf-8", "replace")
        elif kind == EXT_DATA_FILE:
            h["data_file"] = data.decode("utf-8", "replace")
        elif kind == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                ftype, bit = data[i], data[i + 1]
                names[(ftype, bit)] = data[i + 2: i + 48].split(b"\0")[0].decode("utf-8", "replace")
        pos += 8 + ((length + 7) & ~7)
    if h["backing_file_offset"]:
        name = r.read(h["backing_file_offset"], min(h["backing_file_size"], 1023), "backing file name")
        h["backing_file"] = name.decode("utf-8", "replace")
    h["feature_names"] = names
    h["extensions"] = tuple(extensions)
    return Header(**h)


def _check_offset(r: _Reader, offset: int, cluster_size: int, what: str) -> None:
    if offset % cluster_size:
        raise QsimError(f"{r.path}: {what} offset {offset:#x} is not cluster-aligned")
    if offset < cluster_size:
        raise QsimError(f"{r.path}: {what} offset {offset:#x} points into the header")


def in_use(path: str) -> bool:
    """Whether a QEMU process holds its permission locks on the file (asked with F_OFD_GETLK: takes no lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        start, end = QEMU_LOCK_BYTES
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, start, end - start, 0)
        answer = fcntl.fcntl(fd, F_OFD_GETLK, query)
        return struct.unpack("hhqqi", answer)[0] != fcntl.F_UNLCK
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            return False
        raise
    finally:
        os.close(fd)


def read_refcounts(r: _Reader, h: Header) -> tuple[np.ndarray, np.ndarray]:
    """Refcount of every host cluster of the file, and which refcount blocks exist (per refcount table entry)."""
    cs = h.cluster_size
    file_clusters = -(-r.size // cs)
    table_bytes = h.refcount_table_clusters * cs
    if table_bytes > r.size:
        raise QsimError(f"{r.path}: refcount table of {h.refcount_table_clusters} clusters at offset "
                        f"{h.refcount_table_offset:#x} is larger than the file")
    _check_offset(r, h.refcount_table_offset, cs, "refcount table")
    table = np.frombuffer(r.read(h.refcount_table_offset, table_bytes, "refcount table"), ">u8")
    blocks = table & np.uint64(REFT_OFFSET_MASK)
    bits = h.refcount_bits
    per_block = cs * 8 // bits
    refcounts = np.zeros(file_clusters, dtype=np.int64)
    present = blocks != 0
    for index in np.flatnonzero(present):
        first = int(index) * per_block
        if first >= file_clusters:
            continue
        offset = int(blocks[index])
        _check_offset(r, offset, cs, f"refcount block {index}")
        raw = np.frombuffer(r.read(offset, cs, f"refcount block {index}"), np.uint8)
        values = _decode_refcounts(raw, bits)
        n = min(per_block, file_clusters - first)
        refcounts[first: first + n] = values[:n]
    return refcounts, present.astype(np.uint8)


def _decode_refcounts(raw: np.ndarray, bits: int) -> np.ndarray:
    if bits >= 8:
        return raw.view(f">u{bits // 8}").astype(np.int64)
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits  # low bits first, as QEMU's get_refcount_ro0..2
    return ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1).astype(np.int64)


def open_image(path: str) -> Qcow2Image:
    """Read the whole metadata of the qcow2 image at ``path``; QsimError on anything malformed."""
    r = _Reader(path)
    try:
        h = _parse_header(r)
        warnings = []
        if h.incompatible_features & ~KNOWN_INCOMPAT:
            unknown = h.incompatible_features & ~KNOWN_INCOMPAT
            names = [h.feature_names.get((0, b), f"bit {b}") for b in range(64) if unknown >> b & 1]
            raise QsimError(f"{path}: unknown incompatible features ({', '.join(names)}): QEMU would refuse it too")
        if h.incompatible_features & INCOMPAT_DIRTY:
            warnings.append("marked dirty: refcounts may be stale (QEMU repairs them when it opens the image)")
        if h.incompatible_features & INCOMPAT_CORRUPT:
            warnings.append("marked corrupt: QEMU opens it read-only only")
        if h.crypt_method:
            warnings.append(f"encrypted (method {h.crypt_method}): replay models the unencrypted write path")
        if h.incompatible_features & INCOMPAT_DATA_FILE:
            warnings.append(f"external data file {h.data_file!r}: host offsets refer to that file")
        if h.nb_snapshots:
            warnings.append(f"{h.nb_snapshots} internal snapshots: clusters without COPIED are copied on write")
        if in_use(path):
            warnings.append("in use: a QEMU process holds its locks; the metadata read may be inconsistent")
        cs = h.cluster_size
        if h.extended_l2 and cs < 16384:
            raise QsimError(f"{path}: extended_l2 with {cs}-byte clusters is invalid")
        geometry_l1 = ImageGeometry(h.size, cs, h.extended_l2, h.refcount_bits).l1_entries
        if h.l1_size * 8 > MAX_L1_BYTES:
            raise QsimError(f"{path}: L1 table of {h.l1_size} entries (offset 0x24) exceeds QEMU's 32 MiB limit")
        if h.l1_size < geometry_l1:
            raise QsimError(f"{path}: L1 table has {h.l1_size} entries, a {h.size}-byte disk needs {geometry_l1}")
        if h.l1_size:
            _check_offset(r, h.l1_table_offset, cs, "L1 table")
        l1 = np.frombuffer(r.read(h.l1_table_offset, h.l1_size * 8, "L1 table"), ">u8").astype(np.uint64)
        l2_offsets = l1 & np.uint64(L1E_OFFSET_MASK)
        tables = np.flatnonzero(l2_offsets)
        entry_bytes = 16 if h.extended_l2 else 8
        entries = cs // entry_bytes
        if len(tables) * cs > r.size:
            raise QsimError(f"{path}: the L1 table names {len(tables)} L2 tables, more than the file can hold")
        descriptors = np.zeros((len(tables), entries), dtype=np.uint64)
        bitmaps = np.zeros((len(tables), entries), dtype=np.uint64) if h.extended_l2 else None
        seen: dict[int, int] = {}
        for row, index in enumerate(tables):
            offset = int(l2_offsets[index])
            _check_offset(r, offset, cs, f"L2 table of L1 entry {index}")
            if offset in seen:
                raise QsimError(f"{path}: L1 entries {seen[offset]} and {index} share the L2 table at {offset:#x}")
            seen[offset] = int(index)
            raw = np.frombuffer(r.read(offset, cs, f"L2 table of L1 entry {index}"), ">u8")
            if h.extended_l2:
                descriptors[row] = raw[0::2]
                bitmaps[row] = raw[1::2]
            else:
                descriptors[row] = raw
        refcounts, refblocks = read_refcounts(r, h)
        return Qcow2Image(path, r.size, h, l1, tables.astype(np.int64), descriptors, bitmaps, refcounts, refblocks,
                          tuple(warnings))
    finally:
        r.close()
