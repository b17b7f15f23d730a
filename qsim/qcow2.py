"""Read real qcow2 images, read-only, the way QEMU 7.2 opens and checks them.

- ``open_image`` follows ``qcow2_do_open``: every header field, header extension, the snapshot table and the
  bitmap directory pass QEMU's open checks in QEMU's order; what QEMU refuses is refused, quoting QEMU's message.
- It then checks what QEMU calls corrupt (``qcow2_signal_corruption`` on reads, ``qemu-img check``'s corruptions):
  unaligned L1/L2 entries, reserved bits, invalid extended-L2 bitmaps, external-data-file offsets, clusters
  referenced more often than their refcount says (an L2 table or data cluster placed on the L1 table, the refcount
  table, a refcount block, another table...), refcount blocks outside the file, COPIED flags that disagree with
  the refcount. Leaked clusters (refcount above the references) are sound, as for ``qemu-img check``.
- Memory stays bounded by the metadata actually walked: L2 tables are read one at a time (``iter_tables``),
  refcounts are looked up per refcount block on demand, and reference counts are kept only for chunks of host
  clusters that something references. A huge sparse file costs nothing for its holes.

Every problem is one QsimError: file, structure, offset, and the words QEMU uses. The file is opened read-only
(after a stat: never a FIFO or device, which could block), never locked, never written.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import QsimError
from .geometry import MAX_L1_BYTES, ImageGeometry

MAGIC = b"QFI\xfb"
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = (1 << i for i in range(5))
KNOWN_INCOMPAT = 0x1F
AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW = 1, 2
EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_ENCRYPTION, EXT_DATA_FILE = (
    0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77, 0x44415441)
CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
QEMU_LOCK_BYTES = (100, 300)  # file-posix's permission lock bytes (RAW_LOCK_PERM_BASE .. SHARED_BASE + 100)
F_OFD_GETLK = 36
INT_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
MAX_REFTABLE_BYTES = 8 << 20  # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_BYTES = 40
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOTS_BYTES = 1024 * MAX_SNAPSHOTS
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS
CHUNK_BITS = 18  # reference counts (uint8, saturating) are kept per 2^18 host clusters that something references
DENSE_CLUSTERS = 1 << 26  # up to this many host clusters in the file (and at most twice the entries of the L2
# tables), one dense count array
COMPILED_MIN_ENTRIES = 1 << 20  # from this many L2 entries on, the check's dense passes are compiled (qsim.qcow2scan;
# below, numpy's are as quick and a small image's check needs no numba start-up)
SATURATED = 255
BATCH_ENTRIES = 1 << 20  # L2 entries checked in one set of array operations (8 MiB of descriptors)
CORRUPT = 'QEMU: "Image is corrupt"'

# The header in spec order (docs/interop/qcow2.txt, as tests/qemu-iotests/qcow2_format.py declares it): name,
# byte offset, struct format, first version with the field. Parsing and error offsets both follow from it.
HEADER_FIELDS = (
    ("magic", 0, "4s", 2), ("version", 4, "I", 2), ("backing_file_offset", 8, "Q", 2),
    ("backing_file_size", 16, "I", 2), ("cluster_bits", 20, "I", 2), ("size", 24, "Q", 2),
    ("crypt_method", 32, "I", 2), ("l1_size", 36, "I", 2), ("l1_table_offset", 40, "Q", 2),
    ("refcount_table_offset", 48, "Q", 2), ("refcount_table_clusters", 56, "I", 2), ("nb_snapshots", 60, "I", 2),
    ("snapshots_offset", 64, "Q", 2), ("incompatible_features", 72, "Q", 3), ("compatible_features", 80, "Q", 3),
    ("autoclear_features", 88, "Q", 3), ("refcount_order", 96, "I", 3), ("header_length", 100, "I", 3),
    ("compression_type", 104, "B", 3),
)
FIELD_OFFSET = {name: offset for name, offset, _, _ in HEADER_FIELDS}


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
    bitmaps: tuple = ()  # (nb_bitmaps, directory_size, directory_offset) when the bitmaps extension is valid
    crypto_header: tuple = ()  # (offset, length) of the LUKS header

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    entry_offset: int


class _Reader:
    """A regular file opened read-only after a stat (a FIFO, device or folder is refused unopened)."""

    def __init__(self, path: str, what: str = "image"):
        self.path = path
        self.fd = open_regular(path, what)
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise QsimError(f"{self.path}: {what} at offset {offset:#x} ({length} bytes) lies beyond the end of the "
                            f"file ({self.size} bytes): truncated or damaged image")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise QsimError(f"{self.path}: short read of {what} at offset {offset:#x}")
        return data

    def read_into(self, offset: int, out: np.ndarray, what: str) -> None:
        """``out.nbytes`` bytes at ``offset`` straight into ``out`` (no intermediate bytes object)."""
        length = out.nbytes
        if offset < 0 or offset + length > self.size:
            raise QsimError(f"{self.path}: {what} at offset {offset:#x} ({length} bytes) lies beyond the end of the "
                            f"file ({self.size} bytes): truncated or damaged image")
        if os.preadv(self.fd, [memoryview(out).cast("B")], offset) != length:
            raise QsimError(f"{self.path}: short read of {what} at offset {offset:#x}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_regular(path: str, what: str = "image") -> int:
    """An O_RDONLY descriptor of ``path``, which must be a regular file: stat first, open non-blocking, check the
    opened file is the one stat saw (a FIFO swapped in between cannot block the open)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QsimError(f"{path}: no such file") from None
    except PermissionError:
        raise QsimError(f"{path}: permission denied") from None
    except OSError as exc:
        raise QsimError(f"{path}: cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise QsimError(f"{path}: is a directory, not an {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise QsimError(f"{path}: is {kind}, not a regular file; qsim reads {what}s from regular files only")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise QsimError(f"{path}: permission denied") from None
    except OSError as exc:
        raise QsimError(f"{path}: cannot open: {exc.strerror}") from None
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise QsimError(f"{path}: changed while being opened; not reading it")
    return fd


def _refuse(path: str, where: str, problem: str, qemu: str | None = None) -> QsimError:
    return QsimError(f"{path}: {where}: {problem}" + (f' (QEMU: "{qemu}")' if qemu else ""))


def _c_string(raw: bytes) -> str:
    """Bytes as QEMU reads a name: a C string ends at the first NUL. Undecodable bytes survive (surrogateescape)."""
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _field(path: str, name: str, problem: str, qemu: str | None = None) -> QsimError:
    return _refuse(path, f"header field {name} at {FIELD_OFFSET[name]:#x}", problem, qemu)


def _parse_header(r: _Reader) -> Header:
    p = r.path
    if r.size < 72:
        raise QsimError(f"{p}: {r.size} bytes is too short for a qcow2 header")
    raw = r.read(0, min(r.size, 104), "header")
    if raw[:4] != MAGIC:
        raise QsimError(f"{p}: not a qcow2 image (magic {raw[:4]!r} at offset 0, expected {MAGIC!r})")
    h = {}
    for name, offset, fmt, since in HEADER_FIELDS[1:13]:
        h[name] = struct.unpack_from(">" + fmt, raw, offset)[0]
    version = h["version"]
    if version not in (2, 3):
        raise _field(p, "version", f"qcow2 version {version} is not supported (2 or 3)",
                     f"Unsupported qcow2 version {version}")
    if not 9 <= h["cluster_bits"] <= 21:
        raise _field(p, "cluster_bits", f"cluster_bits {h['cluster_bits']} is outside 9..21",
                     f"Unsupported cluster size: 2^{h['cluster_bits']}")
    cs = 1 << h["cluster_bits"]
    if version == 3:
        if len(raw) < 104:
            raise QsimError(f"{p}: truncated version 3 header ({r.size} bytes)")
        for name, offset, fmt, since in HEADER_FIELDS[13:18]:
            h[name] = struct.unpack_from(">" + fmt, raw, offset)[0]
        if h["header_length"] < 104:
            raise _field(p, "header_length", f"{h['header_length']} is below 104", "qcow2 header too short")
    else:
        h["header_length"] = 72
    hlen = h["header_length"]
    if hlen > cs:
        raise _field(p, "header_length", f"{hlen} exceeds the {cs}-byte cluster", "qcow2 header exceeds cluster size")
    header = r.read(0, hlen, "header")
    if h["backing_file_offset"] > cs:
        raise _field(p, "backing_file_offset", f"{h['backing_file_offset']:#x} lies beyond the first cluster",
                     "Invalid backing file offset")
    ext_end = h["backing_file_offset"] or cs
    h["compression_type"] = header[104] if hlen > 104 else 0
    inc = h.get("incompatible_features", 0)
    ct = h["compression_type"]
    if ct not in (0, 1):
        raise _field(p, "compression_type", f"unknown compression type {ct}", f"qcow2: unknown compression type: {ct}")
    if (ct == 1) != bool(inc & INCOMPAT_COMPRESSION):
        must = "must" if ct else "must not"
        raise _field(p, "incompatible_features", f"compression type {ct} with the compression bit "
                     f"{'clear' if ct else 'set'}", f"qcow2: Compression type incompatible feature bit {must} be set")
    cluster0 = r.read(0, min(ext_end, r.size), "header extensions") if ext_end > hlen else header
    names: dict = {}
    if inc & ~KNOWN_INCOMPAT:
        try:  # QEMU reads the feature table first, to name the unknown bits
            _read_extensions(r, h, cluster0, hlen, ext_end, names, strict=False)
        except QsimError:
            pass
        unknown = inc & ~KNOWN_INCOMPAT
        labels = [names.get((0, b), f"bit {b}") for b in range(64) if unknown >> b & 1]
        raise _field(p, "incompatible_features", f"unknown incompatible features ({', '.join(labels)})",
                     "Unsupported IMGFMT feature(s): " + ", ".join(labels))
    if inc & INCOMPAT_EXTL2 and cs < 16384:
        raise _field(p, "cluster_bits", f"extended_l2 with {cs}-byte clusters (subclusters of {cs // 32} bytes)",
                     f"Unsupported subcluster size: {cs // 32}")
    order = h.get("refcount_order", 4)
    if order > 6:
        raise _field(p, "refcount_order", f"{order} is above 6 (64-bit refcounts)",
                     "Reference count entry width too large; may not exceed 64 bits")
    h.setdefault("refcount_order", 4)
    if h["crypt_method"] > CRYPT_LUKS:
        raise _field(p, "crypt_method", f"unknown encryption method {h['crypt_method']}",
                     f"Unsupported encryption method {h['crypt_method']}")
    if h["refcount_table_clusters"] == 0:
        raise _field(p, "refcount_table_clusters", "0: the image has no refcount table",
                     "Image does not contain a reference count table")
    _validate_table(p, "refcount_table_offset", "refcount_table_clusters", h["refcount_table_offset"],
                    h["refcount_table_clusters"], cs, MAX_REFTABLE_BYTES, "Reference count table", cs)
    _validate_table(p, "snapshots_offset", "nb_snapshots", h["snapshots_offset"], h["nb_snapshots"],
                    SNAPSHOT_HEADER_BYTES, SNAPSHOT_HEADER_BYTES * MAX_SNAPSHOTS, "Snapshot table", cs)
    _validate_table(p, "l1_table_offset", "l1_size", h["l1_table_offset"], h["l1_size"], 8, MAX_L1_BYTES,
                    "Active L1 table", cs)
    l2_bits = h["cluster_bits"] - (4 if inc & INCOMPAT_EXTL2 else 3)
    l1_needed = -(-h["size"] // (1 << (h["cluster_bits"] + l2_bits)))
    if l1_needed > INT_MAX:
        raise _field(p, "size", f"virtual size {h['size']} is absurd", "Image is too big")
    if h["l1_size"] < l1_needed:
        raise _field(p, "l1_size", f"L1 table has {h['l1_size']} entries, a {h['size']}-byte disk needs {l1_needed}",
                     "L1 table is too small")
    _read_extensions(r, h, cluster0, hlen, ext_end, names, strict=True)
    if inc & INCOMPAT_DATA_FILE and h.get("data_file") is None:
        raise _field(p, "incompatible_features", "external data file bit set, but no data file name extension",
                     "'data-file' is required for this image")
    if not inc & INCOMPAT_DATA_FILE and h.get("autoclear_features", 0) & AUTOCLEAR_DATA_FILE_RAW:
        raise _field(p, "autoclear_features", "data-file-raw without an external data file",
                     "data-file-raw requires a data file")
    if h["crypt_method"] == CRYPT_LUKS and not h.get("crypto_header"):
        raise _field(p, "crypt_method", "LUKS encryption without a crypto header extension",
                     "Missing CRYPTO header for crypt method 2")
    if h["backing_file_offset"]:
        length = h["backing_file_size"]
        if length > min(1023, cs - h["backing_file_offset"]):
            raise _field(p, "backing_file_size", f"backing file name of {length} bytes at "
                         f"{h['backing_file_offset']:#x} is too long", "Backing file name too long")
        h["backing_file"] = _c_string(r.read(h["backing_file_offset"], length, "backing file name"))
    h["feature_names"] = names
    return Header(**h)


def _validate_table(p: str, offset_field: str, count_field: str, offset: int, entries: int, entry_bytes: int,
                    max_bytes: int, name: str, cs: int) -> None:
    """qcow2_validate_table: the table fits QEMU's limit and starts on a cluster boundary."""
    if entries > max_bytes // entry_bytes:
        raise _field(p, count_field, f"{name.lower()} of {entries} entries is larger than QEMU's limit",
                     f"{name} too large")
    if INT64_MAX - entries * entry_bytes < offset or offset % cs:
        raise _field(p, offset_field, f"{name.lower()} offset {offset:#x} is not cluster-aligned or overflows",
                     f"{name} offset invalid")


def _read_extensions(r: _Reader, h: dict, raw: bytes, start: int, end: int, names: dict, strict: bool) -> None:
    """qcow2_read_extensions: walk the header extensions between the header and ``end``."""
    p, cs = r.path, 1 << h["cluster_bits"]
    kinds = []
    pos = start
    while pos < end:
        if pos + 8 > len(raw):
            raise _refuse(p, f"header extension at {pos:#x}", "lies beyond the end of the file")
        kind, length = struct.unpack_from(">II", raw, pos)
        pos += 8
        if pos > end or length > end - pos:
            raise _refuse(p, f"header extension {kind:#x} at {pos - 8:#x}", f"{length} bytes run past the header "
                          f"area (ends at {end:#x})", "Header extension too large")
        data = raw[pos: pos + length]
        where = f"header extension {kind:#x} at {pos - 8:#x}"
        if kind == 0:
            break
        kinds.append(kind)
        if kind == EXT_BACKING_FORMAT:
            if length >= 16:
                raise _refuse(p, where, f"backing format name of {length} bytes is too long",
                              f"ERROR: ext_backing_format: len={length} too large (>=16)")
            h["backing_format"] = _c_string(data)
        elif kind == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                names[(data[i], data[i + 1])] = data[i + 2: i + 48].split(b"\0")[0].decode("utf-8", "replace")
        elif kind == EXT_ENCRYPTION and strict:
            if h["crypt_method"] != CRYPT_LUKS:
                raise _refuse(p, where, "crypto header without LUKS encryption",
                              "CRYPTO header extension only expected with LUKS encryption method")
            if length != 16:
                raise _refuse(p, where, f"crypto header extension of {length} bytes, expected 16",
                              f"CRYPTO header extension size {length}, but expected size 16")
            offset, size = struct.unpack(">QQ", data)
            if offset % cs:
                raise _refuse(p, where, f"crypto header offset {offset:#x} is not cluster-aligned",
                              f"Encryption header offset '{offset}' is not a multiple of cluster size '{cs}'")
            h["crypto_header"] = (offset, size)
        elif kind == EXT_BITMAPS and strict:
            if length != 24:
                raise _refuse(p, where, f"bitmaps extension of {length} bytes, expected 24",
                              "bitmaps_ext: Invalid extension length")
            if h.get("autoclear_features", 0) & AUTOCLEAR_BITMAPS:
                nb, reserved, dir_size, dir_offset = struct.unpack(">IIQQ", data)
                if reserved:
                    raise _refuse(p, where, "reserved field is not zero", "bitmaps_ext: Reserved field is not zero")
                if nb > MAX_BITMAPS:
                    raise _refuse(p, where, f"{nb} bitmaps, more than QEMU's {MAX_BITMAPS}",
                                  f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of "
                                  f"{MAX_BITMAPS}")
                if nb == 0:
                    raise _refuse(p, where, "zero bitmaps", "found bitmaps extension with zero bitmaps")
                if dir_offset % cs:
                    raise _refuse(p, where, f"bitmap directory offset {dir_offset:#x} is not cluster-aligned",
                                  "bitmaps_ext: invalid bitmap directory offset")
                if dir_size > MAX_BITMAP_DIRECTORY:
                    raise _refuse(p, where, f"bitmap directory of {dir_size} bytes is too large",
                                  f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported "
                                  f"size ({MAX_BITMAP_DIRECTORY})")
                h["bitmaps"] = (nb, dir_size, dir_offset)
        elif kind == EXT_DATA_FILE:
            h["data_file"] = _c_string(data)
        pos += (length + 7) & ~7
    h["extensions"] = tuple(kinds)


def _read_snapshots(r: _Reader, h: Header) -> tuple[tuple[Snapshot, ...], int]:
    """qcow2_read_snapshots: every snapshot header, its extra data, id and name, within QEMU's limits."""
    out = []
    offset = h.snapshots_offset
    for i in range(h.nb_snapshots):
        offset = (offset + 7) & ~7
        start = offset
        raw = r.read(offset, SNAPSHOT_HEADER_BYTES, f"snapshot table entry {i}")
        l1_offset, l1_size, id_size, name_size, _, _, _, _, extra = struct.unpack(">QIHHIIQII", raw)
        if extra > MAX_SNAPSHOT_EXTRA:
            raise _refuse(r.path, f"snapshot table entry {i} at {start:#x}", f"{extra} bytes of extra data, more "
                          f"than QEMU's {MAX_SNAPSHOT_EXTRA}", f"Too much extra metadata in snapshot table entry {i}")
        offset += SNAPSHOT_HEADER_BYTES + extra
        ident = _c_string(r.read(offset, id_size, f"snapshot {i} id"))
        offset += id_size
        name = _c_string(r.read(offset, name_size, f"snapshot {i} name"))
        offset += name_size
        if offset - h.snapshots_offset > MAX_SNAPSHOTS_BYTES:
            raise _refuse(r.path, f"snapshot table at {h.snapshots_offset:#x}", "larger than QEMU's 64 MiB limit",
                          "Snapshot table is too big")
        if h.version >= 3 and extra < 16:
            raise _refuse(r.path, f"snapshot table entry {i} at {start:#x}", f"{extra} bytes of extra data, a "
                          "version 3 snapshot needs 16", "Image is corrupt: snapshot table entry is incomplete")
        out.append(Snapshot(ident, name, l1_offset, l1_size, start))
    return tuple(out), offset - h.snapshots_offset


def _read_bitmap_directory(r: _Reader, h: Header) -> list[tuple[int, int, np.ndarray]]:
    """bitmap_list_load + check_dir_entry + bitmap_table_load: the bitmaps QEMU reads at open. Returns, per bitmap,
    its table's offset and size and the data clusters it names."""
    nb, size, offset = h.bitmaps
    where = f"bitmap directory at {offset:#x}"
    if size == 0:
        raise _refuse(r.path, where, "size 0", "Requested bitmap directory size is zero")
    raw = r.read(offset, size, "bitmap directory")
    pos, count, tables = 0, 0, []
    cs = h.cluster_size
    while pos < size:
        if pos + 24 > size:
            raise _refuse(r.path, where, f"entry at +{pos:#x} is cut off", "Broken bitmap directory")
        count += 1
        if count > nb:
            raise _refuse(r.path, where, f"more than the {nb} bitmaps the header extension names",
                          "More bitmaps found than specified in header extension")
        t_off, t_size, flags, kind, gran, name_size, extra = struct.unpack_from(">QIIBBHI", raw, pos)
        entry_bytes = (24 + extra + name_size + 7) & ~7
        if pos + entry_bytes > size:
            raise _refuse(r.path, where, f"entry at +{pos:#x} is cut off", "Broken bitmap directory")
        if extra:
            raise _refuse(r.path, where, f"entry at +{pos:#x} has extra data", "Bitmap extra data is not supported")
        name = raw[pos + 24: pos + 24 + name_size].decode("utf-8", "replace")
        phys = t_size * cs
        granularity_ok = 9 <= gran <= 31
        bad = (t_size == 0 or t_off == 0 or t_off % cs or t_size > 0x8000000 or not granularity_ok
               or flags & 0xFFFFFFFC or name_size > 1023 or kind != 1 or phys > 0x20000000
               or (not flags & 1 and h.size > (phys * 8) << gran))
        if bad:
            raise _refuse(r.path, f"{where}, entry at +{pos:#x}", f"bitmap {name!r} is invalid",
                          f"Bitmap '{name}' doesn't satisfy the constraints")
        bits_needed = -(-(h.size // 512 * 512) // (1 << gran))  # one bit per granule of the disk (whole sectors)
        serialized = -(-bits_needed // 64) * 8  # hbitmap serializes 64-bit words
        if not flags & 1 and t_size != -(-serialized // cs):
            raise _refuse(r.path, f"{where}, entry at +{pos:#x}", f"bitmap {name!r} has a table of {t_size} "
                          f"clusters, a {h.size}-byte disk needs {-(-serialized // cs)}",
                          f"Could not read bitmap '{name}' from image: Invalid argument")
        raw_table = r.read(t_off, t_size * 8, f"bitmap table of {name!r}")
        table = np.frombuffer(raw_table, ">u8").astype(np.uint64)
        offsets = table & np.uint64(0x00FFFFFFFFFFFE00)
        bad = ((table & np.uint64(0xFF000000000001FE)) != 0) | ((offsets != 0) & (
            ((table & np.uint64(1)) != 0) | ((offsets & np.uint64(cs - 1)) != 0)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _refuse(r.path, f"bitmap table of {name!r} at {t_off:#x}, entry {i}", f"invalid entry "
                          f"{int(table[i]):#x}", f"Could not read bitmap '{name}' from image: Invalid argument")
        tables.append((t_off, t_size, offsets[offsets != 0]))
        pos += entry_bytes
    if count != nb:
        raise _refuse(r.path, where, f"{count} bitmaps, the header extension names {nb}",
                      "Less bitmaps found than specified in header extension")
    return tables


def in_use(path: str) -> bool:
    """Whether a QEMU process holds its permission locks on the file (asked with F_OFD_GETLK: takes no lock)."""
    try:
        fd = open_regular(path)
    except QsimError:
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


def _decode_refcounts(raw: np.ndarray, bits: int) -> np.ndarray:
    """One refcount block's values, unsigned, in native byte order and their own width (as compact as stored)."""
    if bits >= 8:
        return raw.view(f">u{bits // 8}").astype(f"u{bits // 8}")
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits  # low bits first, as QEMU's get_refcount_ro0..2
    return ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1).astype(np.uint8)


class Qcow2Image:
    """One opened image: its header, L1 table and refcount table in memory; L2 tables and refcount blocks read on
    demand. ``iter_tables`` streams the L2 tables (entries checked as QEMU checks them on reads); ``refcount_of``
    looks refcounts up. ``data_file`` / ``data_bytes``: with an external data file, its resolved path and size,
    which bound the data offsets (host offset 0 is then valid data); otherwise the image file and its size.

    The whole-image arrays of earlier versions (``l2_tables``, ``l2_descriptors``, ``l2_bitmaps``, ``refcounts``,
    ``refblock_present``) are still there, built on first use (they cost memory in proportion to the image)."""

    def __init__(self, reader: _Reader, header: Header, warnings: list[str]):
        self._r = reader
        self.path = reader.path
        self.file_bytes = reader.size
        self.header = h = header
        self.warnings = tuple(warnings)
        cs = h.cluster_size
        self.l1 = np.frombuffer(reader.read(h.l1_table_offset, h.l1_size * 8, "L1 table"), ">u8").astype(np.uint64) \
            if h.l1_size else np.zeros(0, np.uint64)
        self.reftable = np.frombuffer(reader.read(h.refcount_table_offset, h.refcount_table_clusters * cs,
                                                  "refcount table"), ">u8").astype(np.uint64)
        self.data_file = None
        self.data_bytes = reader.size
        if h.has_data_file:
            name = h.data_file
            self.data_file = name if os.path.isabs(name) else os.path.join(os.path.dirname(self.path), name)
            try:  # QEMU opens the data file with the image (qcow2_do_open): missing is refused there
                fd = open_regular(self.data_file, "data file")
            except QsimError as exc:
                raise _refuse(self.path, f"external data file {name!r}", str(exc).split(": ", 1)[-1],
                              f"Could not open '{self.data_file}'") from None
            self.data_bytes = os.fstat(fd).st_size
            os.close(fd)
        self.snapshots: tuple[Snapshot, ...] = ()
        self.snapshots_bytes = 0
        self._refblocks: OrderedDict = OrderedDict()

    @property
    def has_data_file(self) -> bool:
        return self.header.has_data_file

    @property
    def geometry(self) -> ImageGeometry:
        h = self.header
        return ImageGeometry(h.size, h.cluster_size, h.extended_l2, h.refcount_bits)

    def close(self) -> None:
        self._r.close()

    def __del__(self):
        r = getattr(self, "_r", None)
        if r is not None:
            r.close()

    # --- L2 tables ------------------------------------------------------------------------------------------

    def l2_offsets(self) -> np.ndarray:
        return self.l1 & np.uint64(L1E_OFFSET_MASK)

    def read_l2(self, index: int, offset: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The L2 table of L1 entry ``index`` at ``offset``: descriptors and (extended_l2) bitmaps, uint64 (views of
        ``out``, a uint64 array of one cluster, when given)."""
        cs = self.header.cluster_size
        where = f"L1 table at {self.header.l1_table_offset:#x}, entry {index}"
        if offset % cs:
            raise _refuse(self.path, where, f"L2 table offset {offset:#x} unaligned", "Image is corrupt: L2 table "
                          f"offset {offset:#x} unaligned (L1 index: {index:#x})")
        if offset < cs:
            raise _refuse(self.path, where, f"L2 table offset {offset:#x} points into the header", "Image is corrupt")
        raw = np.empty(cs // 8, np.uint64) if out is None else out
        self._r.read_into(offset, raw, f"L2 table of L1 entry {index}")
        raw.byteswap(inplace=True)  # (big-endian on disk)
        if self.header.extended_l2:
            return raw[0::2], raw[1::2]
        return raw, None

    def iter_tables(self, within_disk: bool = True, check: bool = True
                    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
        """Each allocated L2 table of the active L1 table, in L1 order: (L1 index, table offset, descriptors,
        bitmaps or None), its entries checked the way QEMU's reads check them (QsimError: corrupt)."""
        offsets = self.l2_offsets()
        limit = self.geometry.l1_entries if within_disk else len(offsets)
        for index in np.flatnonzero(offsets[:limit]).tolist():
            offset = int(offsets[index])
            d, b = self.read_l2(index, offset)
            if check:
                self._check_entries(index, offset, d, b, active=True)
            yield index, offset, d, b

    @property
    def plain_entry_bits(self) -> int:
        """The bits a plain L2 entry may have set (no extended L2, no external data file): COPIED, a
        cluster-aligned offset and, in a version 3 image, ZERO. An entry with no other bit set is sound."""
        h = self.header
        return OFLAG_COPIED | (L2E_OFFSET_MASK & ~(h.cluster_size - 1)) | (OFLAG_ZERO if h.version >= 3 else 0)

    def _check_entries(self, index: int, offset: int, d: np.ndarray, b: np.ndarray | None, active: bool) -> None:
        """What qcow2_get_host_offset / count_contiguous_subclusters and qemu-img check's check_refcounts_l2 call
        corrupt, entry by entry."""
        h = self.header
        cs = h.cluster_size
        ext = b is not None
        if not ext and not self.has_data_file:  # one pass for the common case: aligned offsets, flags QEMU allows
            if not (d & np.uint64(~self.plain_entry_bits & (2**64 - 1))).any():
                return
        compressed = (d & np.uint64(OFLAG_COMPRESSED)) != 0
        host = d & np.uint64(L2E_OFFSET_MASK)
        zero_flag = ((d & np.uint64(OFLAG_ZERO)) != 0) & ~compressed & (not ext)
        copied = (d & np.uint64(OFLAG_COPIED)) != 0
        if self.has_data_file:
            normal = ~compressed & ((host != 0) | (copied & ~zero_flag) | (zero_flag & (host != 0)))
        else:
            normal = ~compressed & (host != 0)

        def fail(mask: np.ndarray, problem, qemu: str):
            i = int(np.flatnonzero(mask)[0])
            text = problem(i) if callable(problem) else problem
            where = f"L2 table at {offset:#x}, entry {i}" + ("" if active else " (snapshot)")
            raise _refuse(self.path, where, text, qemu.format(i=i, e=int(d[i]), host=int(host[i]), l2=offset))

        bad = ~compressed & ((d & np.uint64(L2E_STD_RESERVED_MASK)) != 0)
        if bad.any():
            fail(bad, lambda i: f"reserved bits set in {int(d[i]):#x}", "Image is corrupt")
        if h.version < 3 and not ext and zero_flag.any():
            fail(zero_flag, "zero cluster in a version 2 image", "Image is corrupt: Zero cluster entry found in "
                 "pre-v3 image (L2 offset: {l2:#x}, L2 index: {i:#x})")
        unaligned = normal & ((host & np.uint64(cs - 1)) != 0)
        if unaligned.any():
            fail(unaligned, lambda i: f"cluster allocation offset {int(host[i]):#x} unaligned",
                 "Image is corrupt: Cluster allocation offset {host:#x} unaligned (L2 offset: {l2:#x}, L2 index: "
                 "{i:#x})")
        bad = compressed & copied
        if bad.any():
            fail(bad, "COPIED flag on a compressed cluster", "Image is corrupt")
        if self.has_data_file:
            if compressed.any():
                fail(compressed, "compressed cluster in an image with an external data file",
                     "Image is corrupt: Compressed cluster entry found in image with external data file")
            guest = (np.uint64(index) * np.uint64(len(d)) + np.arange(len(d), dtype=np.uint64)) * np.uint64(cs)
            bad = normal & (host != guest)
            if bad.any():
                fail(bad, lambda i: f"external data file offset {int(host[i]):#x} is not the guest offset "
                     f"{int(guest[i]):#x}", "Image is corrupt: External data file host cluster offset {host:#x} "
                     "does not match guest cluster offset")
        if ext:
            alloc = b & np.uint64(0xFFFFFFFF)
            bad = (normal & (((b >> np.uint64(32)) & alloc) != 0)) | (~compressed & ~normal & (alloc != 0)) | (
                compressed & (b != 0))
            if bad.any():
                fail(bad, lambda i: f"invalid subcluster bitmap {int(b[i]):#018x}", "Image is corrupt: Invalid "
                     "cluster entry found (L2 offset: {l2:#x}, L2 index: {i:#x})")

    # --- refcounts ------------------------------------------------------------------------------------------

    @property
    def refblock_bits(self) -> int:
        h = self.header
        return h.cluster_bits + 3 - h.refcount_order

    def refblock(self, index: int) -> np.ndarray | None:
        """Refcounts of refcount block ``index`` (None when the refcount table has no block there)."""
        if index >= len(self.reftable):
            return None
        cached = self._refblocks.get(index)
        if cached is not None:
            self._refblocks.move_to_end(index)
            return cached
        entry = int(self.reftable[index])
        offset = entry & REFT_OFFSET_MASK
        if not offset:
            return None
        cs = self.header.cluster_size
        where = f"refcount table at {self.header.refcount_table_offset:#x}, entry {index}"
        if entry & REFT_RESERVED_MASK or offset % cs:
            raise _refuse(self.path, where, f"refcount block offset {entry:#x} unaligned or with reserved bits",
                          f"Image is corrupt: Refblock offset {offset:#x} unaligned (reftable index: {index:#x})")
        if offset + cs > self.file_bytes:
            raise _refuse(self.path, where, f"refcount block at {offset:#x} lies outside the file",
                          f"Image is corrupt: refcount block {index} is outside image")
        values = _decode_refcounts(np.frombuffer(self._r.read(offset, cs, f"refcount block {index}"), np.uint8),
                                   self.header.refcount_bits)
        self._refblocks[index] = values
        if len(self._refblocks) > 64:
            self._refblocks.popitem(last=False)
        return values

    def refcount_of(self, clusters: np.ndarray) -> np.ndarray:
        """Stored refcount of each host cluster index (0 where no refcount block covers it)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        out = np.zeros(len(clusters), dtype=np.uint64)
        if not len(clusters):
            return out
        bits = self.refblock_bits
        blocks = clusters >> bits
        order = None if (blocks[1:] >= blocks[:-1]).all() else np.argsort(blocks, kind="stable")
        ordered = clusters if order is None else clusters[order]
        runs = np.flatnonzero(np.diff(ordered >> bits)) + 1
        found = np.zeros(len(clusters), dtype=np.uint64)
        for a, b in zip(np.r_[0, runs].tolist(), np.r_[runs, len(clusters)].tolist()):
            values = self.refblock(int(ordered[a]) >> bits)
            if values is not None:
                found[a:b] = values[ordered[a:b] & ((1 << bits) - 1)]
        if order is None:
            return found
        out[order] = found
        return out

    # --- the whole-image arrays of earlier versions ---------------------------------------------------------

    @functools.cached_property
    def _tables(self):
        kept = self.__dict__.pop("_checked_tables", None)  # the active L2 tables as the check read them
        if kept is not None:
            rows, words = kept  # (every table's words in L1 order, in one array)
            entries = self.geometry.l2_entries_per_table
            if not self.header.extended_l2:
                return rows, words.reshape(-1, entries), None
            pairs = words.reshape(-1, entries, 2)
            return rows, pairs[:, :, 0], pairs[:, :, 1]
        rows, ds, bs = [], [], []
        for index, _, d, b in self.iter_tables(within_disk=False, check=False):
            rows.append(index)
            ds.append(d)
            bs.append(b)
        entries = self.geometry.l2_entries_per_table
        d = np.stack(ds) if ds else np.zeros((0, entries), np.uint64)
        b = (np.stack(bs) if bs else np.zeros((0, entries), np.uint64)) if self.header.extended_l2 else None
        return np.asarray(rows, dtype=np.int64), d, b

    @property
    def l2_tables(self) -> np.ndarray:
        return self._tables[0]

    @property
    def l2_descriptors(self) -> np.ndarray:
        return self._tables[1]

    @property
    def l2_bitmaps(self) -> np.ndarray | None:
        return self._tables[2]

    @property
    def file_clusters(self) -> int:
        """Host clusters of the image file, a partial last one included."""
        return -(-self.file_bytes // self.header.cluster_size)

    def refcount_runs(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first host cluster, refcounts) of each refcount block the table has, in order, cut at the file's end:
        read one block at a time, so a caller may stop early."""
        n = self.file_clusters
        per = 1 << self.refblock_bits
        for index in np.flatnonzero(self.reftable & np.uint64(REFT_OFFSET_MASK)).tolist():
            first = index * per
            if first >= n:
                break
            yield first, self.refblock(index)[: n - first]

    @functools.cached_property
    def refcounts(self) -> np.ndarray:
        """int64 refcount of every host cluster of the image file (0 beyond the blocks)."""
        out = np.zeros(self.file_clusters, dtype=np.int64)
        for first, values in self.refcount_runs():
            out[first: first + len(values)] = values
        return out

    @functools.cached_property
    def refcounts_clipped(self) -> np.ndarray:
        """uint8 refcount of every host cluster of the image file, clipped at 255 (0 beyond the blocks): a byte a
        cluster, for the check's compiled passes and ``host_used``."""
        out = np.zeros(self.file_clusters, dtype=np.uint8)
        for first, values in self.refcount_runs():
            np.minimum(values, SATURATED, out=out[first:first + len(values)], casting="unsafe")
        return out

    @property
    def host_used(self) -> np.ndarray:
        """uint8 1 for every host cluster of the image file with a refcount above 0 (``refcounts > 0`` at a byte a
        cluster)."""
        return np.minimum(self.refcounts_clipped, 1)

    @property
    def refblock_present(self) -> np.ndarray:
        return ((self.reftable & np.uint64(REFT_OFFSET_MASK)) != 0).astype(np.uint8)

    # --- qemu-img check's corruptions -----------------------------------------------------------------------

    def check(self, keep_tables: bool = False) -> None:
        """Raise QsimError on the first thing ``qemu-img check`` counts as a corruption (leaks are fine).
        ``keep_tables``: keep the active L2 tables read for ``l2_descriptors`` (not read a second time)."""
        checker = _Check(self, keep_tables)
        checker.run()
        if keep_tables:
            self._checked_tables = (checker.kept_rows, checker.kept_words)


class _Check:
    """qemu-img check (calculate_refcounts, compare_refcounts, check_oflag_copied) with sparse reference counts."""

    def __init__(self, img: Qcow2Image, keep_tables: bool = False):
        self.img = img
        self.keep_tables = keep_tables
        self.kept_rows = np.zeros(0, np.int64)  # (keep_tables) the active L1 table's L2 tables: L1 indices,
        self.kept_words = np.zeros(0, np.uint64)  # and each one's words (a cluster each), read straight into place
        self.cs = img.header.cluster_size
        self.bits = img.header.cluster_bits
        self.chunks: dict[int, np.ndarray] = {}
        self.chunk_bits = CHUNK_BITS
        self.dense: np.ndarray | None = None  # all the counts in one chunk, for the compiled passes (qsim.qcow2scan)
        file_clusters = img.file_clusters
        entries = int(np.count_nonzero(img.l1)) * img.geometry.l2_entries_per_table
        self.compiled_entries = entries
        if file_clusters <= min(DENSE_CLUSTERS, 2 * entries + 4096):  # (a byte a cluster, no more than the tables)
            self.chunk_bits = max(CHUNK_BITS, (file_clusters + 1).bit_length())
            self.dense = self.chunks[0] = np.zeros(file_clusters + 2, dtype=np.uint8)  # (add allows a cluster more)
        self.what: dict[int, str] = {}  # a name for metadata clusters, for the message
        self.many: dict[int, int] = {}  # exact counts of clusters referenced 255 times or more

    def corrupt(self, where: str, problem: str, qemu: str = "Image is corrupt") -> QsimError:
        return _refuse(self.img.path, where, problem, qemu)

    def add(self, offset: int, size: int, what: str) -> None:
        """qcow2_inc_refcounts_imrt for one region."""
        if size <= 0:
            return
        if offset + size - self.img.file_bytes >= self.cs:
            raise self.corrupt(what, f"region {offset:#x}+{size:#x} lies beyond the end of the file "
                               f"({self.img.file_bytes} bytes)")
        first, last = offset >> self.bits, (offset + size - 1) >> self.bits
        for c in range(first, last + 1):
            self.what.setdefault(c, what)
        self.add_clusters(np.arange(first, last + 1, dtype=np.int64))

    def add_clusters(self, clusters: np.ndarray) -> None:
        """One more reference to each cluster (a cluster may appear several times). Counts are uint8 per chunk;
        a count that reaches 255 moves to ``self.many`` (exact), so the common case costs a byte per cluster."""
        if not len(clusters):
            return
        clusters = np.asarray(clusters, dtype=np.int64)
        if len(clusters) > 1 and not (clusters[1:] >= clusters[:-1]).all():
            clusters = np.sort(clusters)
        runs = np.flatnonzero(np.diff(clusters >> self.chunk_bits)) + 1
        mask = (1 << self.chunk_bits) - 1
        for a, b in zip(np.r_[0, runs].tolist(), np.r_[runs, len(clusters)].tolist()):
            sel = clusters[a:b]
            k = int(sel[0]) >> self.chunk_bits
            counts = self.chunks.get(k)
            if counts is None:
                counts = self.chunks[k] = np.zeros(1 << self.chunk_bits, dtype=np.uint8)
            local = sel & mask
            if len(local) > 1 and not (local[1:] > local[:-1]).all():  # (sorted) each once: the common case
                local, n = np.unique(local, return_counts=True)
            else:
                n = 1
            total = counts[local].astype(np.int64) + n
            full = total >= SATURATED
            if full.any():
                for c, t in zip((local[full] + (k << self.chunk_bits)).tolist(), total[full].tolist()):
                    self.many[c] = self.many.get(c, SATURATED) + t - SATURATED
                total = np.minimum(total, SATURATED)
            counts[local] = total.astype(np.uint8)

    def count(self, cluster: int) -> int:
        counts = self.chunks.get(cluster >> self.chunk_bits)
        n = int(counts[cluster & ((1 << self.chunk_bits) - 1)]) if counts is not None else 0
        return self.many.get(cluster, n) if n == SATURATED else n

    def data_refs(self, index: int, offset: int, d: np.ndarray, b, active: bool) -> None:
        img = self.img
        compressed = (d & np.uint64(OFLAG_COMPRESSED)) != 0
        host = d & np.uint64(L2E_OFFSET_MASK)
        normal = ~compressed & (host != 0)
        if not img.has_data_file:
            clusters = (host[normal] >> np.uint64(self.bits)).astype(np.int64)
            beyond = normal & (host >= np.uint64(img.file_bytes))
            if beyond.any():
                i = int(np.flatnonzero(beyond)[0])
                raise self.corrupt(f"L2 table at {offset:#x}, entry {i}", f"data cluster at {int(host[i]):#x} lies "
                                   f"beyond the end of the file ({img.file_bytes} bytes)")
            self.add_clusters(clusters)
            if active:
                copied = (d[normal] & np.uint64(OFLAG_COPIED)) != 0
                refs = img.refcount_of(clusters)
                bad = (refs == 1) != copied
                if bad.any():
                    i = int(np.flatnonzero(normal)[np.flatnonzero(bad)[0]])
                    raise self.corrupt(f"L2 table at {offset:#x}, entry {i}", f"COPIED flag "
                                       f"{'set' if copied[np.flatnonzero(bad)[0]] else 'clear'} but the data cluster's "
                                       f"refcount is {int(refs[np.flatnonzero(bad)[0]])}")
        elif active:
            bad = normal & ((d & np.uint64(OFLAG_COPIED)) == 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise self.corrupt(f"L2 table at {offset:#x}, entry {i}", "COPIED flag clear on a cluster of an "
                                   "external data file (its refcount is always 1)")
        if compressed.any():
            shift = 62 - (self.bits - 8)
            cmask = (1 << shift) - 1
            for e in d[compressed].tolist():
                coffset = e & cmask
                sectors = ((e >> shift) & ((1 << (self.bits - 8)) - 1)) + 1
                size = sectors * 512 - (coffset & 511)
                if coffset + size - img.file_bytes >= self.cs:
                    raise self.corrupt(f"L2 table at {offset:#x}", f"compressed cluster at {coffset:#x} lies beyond "
                                       "the end of the file")
                self.add_clusters(np.arange(coffset >> self.bits, ((coffset + size - 1) >> self.bits) + 1))

    def l1_refs(self, l1_offset: int, l1: np.ndarray, active: bool, label: str) -> None:
        """The L1 table's L2 tables and their data clusters, checked a batch of tables at a time (one set of array
        operations per BATCH_ENTRIES entries); a batch that fails is walked again table by table, which raises the
        first problem in QEMU's order with its exact table and entry."""
        self.add(l1_offset, len(l1) * 8, label)
        used = np.flatnonzero(l1).tolist()
        per_batch = max(BATCH_ENTRIES // self.img.geometry.l2_entries_per_table, 1)
        words = self.cs // 8
        keep = active and self.keep_tables
        if keep:
            self.kept_rows = np.asarray(used, np.int64)
            self.kept_words = np.empty(len(used) * words, np.uint64)
        for start in range(0, len(used), per_batch):
            batch = used[start:start + per_batch]
            # the batch's tables land in their place in kept_words, or in a scratch array
            into = self.kept_words[start * words:(start + len(batch)) * words] if keep else \
                np.empty(len(batch) * words, np.uint64)
            try:
                done = self.batch_refs(l1_offset, l1, batch, active, label, into)
            except QsimError:
                self.table_refs(l1_offset, l1, batch, active, label, into)  # raises the first problem, exactly
                raise
            if not done:
                self.table_refs(l1_offset, l1, batch, active, label, into)

    def batch_refs(self, l1_offset: int, l1: np.ndarray, batch: list[int], active: bool, label: str,
                   into: np.ndarray) -> bool:
        """``table_refs`` over several tables at once (read into ``into``, a cluster each); False (nothing done) for
        an image with an external data file or compressed clusters, which go table by table. QsimError, not
        necessarily the first problem, if any."""
        img = self.img
        if img.has_data_file:
            return False
        entries = l1[batch]
        offsets = (entries & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
        bad = self.corrupt(f"{label} at {l1_offset:#x}", "an L2 table entry is invalid")
        if (entries & np.uint64(L1E_RESERVED_MASK)).any() or (offsets % self.cs).any() or \
                (offsets < self.cs).any() or (offsets >= img.file_bytes).any():
            raise bad
        clusters = offsets >> self.bits
        if active and ((img.refcount_of(clusters) == 1) != ((entries & np.uint64(OFLAG_COPIED)) != 0)).any():
            raise bad
        words = self.cs // 8
        for k, (index, offset) in enumerate(zip(batch, offsets.tolist())):
            img.read_l2(index, offset, into[k * words:(k + 1) * words])
        d, b = (into[0::2], into[1::2]) if img.header.extended_l2 else (into, None)
        if not self.plain_refs(d, b, active):  # (the compiled pass saw something: the exact path says what)
            if ((d & np.uint64(OFLAG_COMPRESSED)) != 0).any():
                return False
            img._check_entries(batch[0], int(offsets[0]), d, b, active)
            self.data_refs(batch[0], int(offsets[0]), d, b, active)
        for offset in offsets.tolist():
            self.what.setdefault(offset >> self.bits, f"L2 table at {offset:#x}")
        self.add_clusters(clusters)
        return True

    def plain_refs(self, d: np.ndarray, b: np.ndarray | None, active: bool) -> bool:
        """``_check_entries`` and ``data_refs`` of a batch in one compiled pass, for plain entries (no extended L2,
        no external data file) of an image with dense counts; False (nothing done) when the batch is not plain or
        has anything that needs the exact path."""
        img = self.img
        if self.dense is None or b is not None or img.has_data_file or self.compiled_entries < COMPILED_MIN_ENTRIES:
            return False
        from .qcow2scan import count_plain_refs

        stored = img.refcounts_clipped
        return count_plain_refs(d, np.uint64(img.plain_entry_bits), np.uint64(self.bits), np.uint64(img.file_bytes),
                                stored, self.dense, active) < 0

    def table_refs(self, l1_offset: int, l1: np.ndarray, batch: list[int], active: bool, label: str,
                   into: np.ndarray) -> None:
        img = self.img
        words = self.cs // 8
        for k, index in enumerate(batch):
            entry = int(l1[index])
            where = f"{label} at {l1_offset:#x}, entry {index}"
            if entry & L1E_RESERVED_MASK:
                raise self.corrupt(where, f"reserved bits set in {entry:#x}")
            offset = entry & L1E_OFFSET_MASK
            self.add(offset, self.cs, f"L2 table at {offset:#x}")
            if active:
                ref = int(img.refcount_of(np.array([offset >> self.bits]))[0])
                if (ref == 1) != bool(entry & OFLAG_COPIED):
                    raise self.corrupt(where, f"COPIED flag {'set' if entry & OFLAG_COPIED else 'clear'} but the L2 "
                                       f"table's refcount is {ref}")
            d, b = img.read_l2(index, offset, into[k * words:(k + 1) * words])
            img._check_entries(index, offset, d, b, active)
            self.data_refs(index, offset, d, b, active)

    def run(self) -> None:
        img, h, cs = self.img, self.img.header, self.cs
        self.add(0, cs, "header")
        self.l1_refs(h.l1_table_offset, img.l1, True, "L1 table")
        if img.has_data_file and img.snapshots:
            raise self.corrupt(f"snapshot table at {h.snapshots_offset:#x}", f"{len(img.snapshots)} snapshots in an "
                               "image with an external data file")
        for i, sn in enumerate(img.snapshots):
            where = f"snapshot table entry {i} at {sn.entry_offset:#x}"
            if sn.l1_table_offset % cs:
                raise self.corrupt(where, f"L1 table offset {sn.l1_table_offset:#x} is not cluster-aligned")
            if sn.l1_size > MAX_L1_BYTES // 8:
                raise self.corrupt(where, f"L1 table of {sn.l1_size} entries is too large")
            if sn.l1_size:
                l1 = np.frombuffer(img._r.read(sn.l1_table_offset, sn.l1_size * 8, f"L1 table of snapshot {i}"),
                                   ">u8").astype(np.uint64)
                self.l1_refs(sn.l1_table_offset, l1, False, f"L1 table of snapshot {i}")
        self.add(h.snapshots_offset, img.snapshots_bytes, "snapshot table")
        self.add(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
        if h.crypto_header:
            self.add(h.crypto_header[0], h.crypto_header[1], "crypto header")
        if h.bitmaps:  # qcow2_check_bitmaps_refcounts
            self.add(h.bitmaps[2], h.bitmaps[1], "bitmap directory")
        for t_off, t_size, data in getattr(img, "bitmap_tables", ()):
            self.add(t_off, t_size * 8, "bitmap table")
            for offset in data.tolist():
                self.add(offset, cs, "bitmap data")
        file_clusters = img.file_clusters
        blocks = []
        for index in np.flatnonzero(img.reftable).tolist():
            entry = int(img.reftable[index])
            where = f"refcount table at {h.refcount_table_offset:#x}, entry {index}"
            offset = entry & REFT_OFFSET_MASK
            if entry & REFT_RESERVED_MASK:
                raise self.corrupt(where, f"reserved bits set in {entry:#x}")
            if offset % cs:
                raise self.corrupt(where, f"refcount block offset {offset:#x} is not cluster-aligned")
            if offset >> self.bits >= file_clusters:
                raise self.corrupt(where, f"refcount block at {offset:#x} lies outside the file")
            if offset:
                self.add(offset, cs, f"refcount block {index}")
                blocks.append((index, offset >> self.bits))
        for index, cluster in blocks:
            n = self.count(cluster)
            if n != 1:
                raise self.corrupt(f"refcount table at {h.refcount_table_offset:#x}, entry {index}",
                                   f"refcount block at {cluster * cs:#x} is also used as "
                                   f"{self.what.get(cluster, 'something else')}")
        for k, counts in sorted(self.chunks.items()):  # compare_refcounts: fewer references stored than made
            if self.dense is not None and self.compiled_entries >= COMPILED_MIN_ENTRIES:
                from .qcow2scan import suspects  # (only the suspects are looked at closely)

                used = suspects(counts, img.refcounts_clipped)
            else:
                used = np.flatnonzero(counts)
            clusters = (np.int64(k) << self.chunk_bits) + used
            stored = img.refcount_of(clusters)
            made = counts[used].astype(np.uint64)
            for i in np.flatnonzero(made == SATURATED).tolist():
                made[i] = self.many[int(clusters[i])]
            bad = stored < made
            if bad.any():
                c = int(clusters[np.flatnonzero(bad)[0]])
                n = int(made[np.flatnonzero(bad)[0]])
                raise self.corrupt(f"host cluster {c} at {c * cs:#x}", f"referenced {n} times ("
                                   f"{self.what.get(c, 'data')}{' and more' if n > 1 else ''}) but its refcount is "
                                   f"{int(stored[np.flatnonzero(bad)[0]])}")


def open_image(path: str, check: bool = True, keep_tables: bool = False) -> Qcow2Image:
    """Open the qcow2 image at ``path`` as QEMU would, and (``check``) refuse what qemu-img check calls corrupt.
    QsimError on anything QEMU refuses or calls corrupt, naming the structure and its offset."""
    r = _Reader(path)
    try:
        h = _parse_header(r)
        warnings = []
        if h.incompatible_features & INCOMPAT_DIRTY:
            warnings.append("marked dirty: refcounts may be stale (QEMU repairs them when it opens the image)")
        if h.incompatible_features & INCOMPAT_CORRUPT:
            warnings.append("marked corrupt: QEMU opens it read-only only")
        if h.crypt_method:
            warnings.append(f"encrypted (method {h.crypt_method}): replay models the unencrypted write path")
        if h.has_data_file:
            warnings.append(f"external data file {h.data_file!r}: host offsets refer to that file")
        if h.nb_snapshots:
            warnings.append(f"{h.nb_snapshots} internal snapshots: clusters without COPIED are copied on write")
        if in_use(path):
            warnings.append("in use: a QEMU process holds its locks; the metadata read may be inconsistent")
        img = Qcow2Image(r, h, warnings)
        img.snapshots, img.snapshots_bytes = _read_snapshots(r, h)
        if h.bitmaps:
            img.bitmap_tables = _read_bitmap_directory(r, h)
        if check and not h.incompatible_features & INCOMPAT_DIRTY:
            img.check(keep_tables)
        elif check:  # QEMU repairs the refcounts of a dirty image on open; the tables themselves must be sound
            for _ in img.iter_tables(within_disk=False):
                pass
        return img
    except BaseException:
        r.close()
        raise
