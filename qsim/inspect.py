"""``qsim inspect``: what a real qcow2 image holds, how its data is laid out, and the L2 cache it needs.

Both the summary and ``--map`` walk the L2 tables one at a time (``Qcow2Image.iter_tables``), so memory stays
bounded by one table and the run being built, however large the disk: ``--map`` streams the way ``qemu-img map``
does and prints exactly what ``qemu-img map --output=json`` prints (7.2's keys; ``"compressed"`` from 8.2 on).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Iterator

import numpy as np

from .backing import BackingError, walk_chain
from .cachecfg import resolve_cache
from .errors import QsimError
from .qcow2 import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, Qcow2Image, open_image
from .qcow2 import open_regular

DATA, ZERO, COMPRESSED_DATA, UNALLOCATED, UNALLOCATED_AT, ZERO_AT = 1, 2, 3, 0, 4, 5
WITH_HOST = (DATA, UNALLOCATED_AT, ZERO_AT)
MAP_KEYS_72 = ("start", "length", "depth", "present", "zero", "data")
COMPRESSED_KEY_SINCE = (8, 2)  # qemu-img map --output=json prints "compressed" from QEMU 8.2 on


def _popcount(values: np.ndarray) -> int:
    return int(np.unpackbits(values.astype(">u4").view(np.uint8)).sum()) if values.size else 0


def entry_kinds(img: Qcow2Image, index: int, d: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Kind and host offset of each cluster of one L2 table (one row per subcluster with extended_l2)."""
    g = img.geometry
    compressed = (d & np.uint64(OFLAG_COMPRESSED)) != 0
    host = np.where(compressed, np.uint64(0), d & np.uint64(L2E_OFFSET_MASK)).astype(np.int64)
    has_host = host != 0
    if img.has_data_file:  # host offset 0 is valid data there: COPIED tells it from unallocated (qcow2.h), after
        # the zero flag without extended_l2 (qcow2_get_cluster_type: zero with offset 0 is zero, plain)
        zero_flag = ((d & np.uint64(OFLAG_ZERO)) != 0) & (b is None)
        has_host |= ~compressed & ~zero_flag & ((d & np.uint64(OFLAG_COPIED)) != 0)
    if b is None:
        zero = ((d & np.uint64(OFLAG_ZERO)) != 0) & ~compressed
        kind = np.select([compressed, zero & has_host, zero, has_host], [COMPRESSED_DATA, ZERO_AT, ZERO, DATA],
                         UNALLOCATED)
        return kind, host
    spc = g.subclusters_per_cluster
    sc = np.arange(spc, dtype=np.uint64)
    alloc = ((b[:, None] >> sc) & np.uint64(1)).astype(bool)
    zero = ((b[:, None] >> (sc + np.uint64(32))) & np.uint64(1)).astype(bool)
    hh = has_host[:, None]
    kind = np.select([zero & hh, alloc & hh, zero, hh], [ZERO_AT, DATA, ZERO, UNALLOCATED_AT], UNALLOCATED)
    kind = np.where(compressed[:, None], COMPRESSED_DATA, kind).reshape(-1)
    host = np.where(hh, host[:, None] + (np.arange(spc) * g.subcluster_size)[None, :], 0).reshape(-1)
    return kind, host


def inspect_image(path: str) -> dict:
    """The facts ``qsim inspect`` prints, as a plain dict (sizes in bytes)."""
    img = open_image(path)
    h, g = img.header, img.geometry
    cs = g.cluster_size
    tables = normal = zero = compressed = runs = normal_total = sub_alloc = sub_zero = 0
    last_host = None
    per_table = g.l2_entries_per_table
    for index, _, d, b in img.iter_tables(within_disk=False):
        tables += 1
        if index >= g.l1_entries:
            continue
        n = min(per_table, g.clusters - index * per_table)
        d = d[:n]
        is_c = (d & np.uint64(OFLAG_COMPRESSED)) != 0
        host = np.where(is_c, np.uint64(0), d & np.uint64(L2E_OFFSET_MASK)).astype(np.int64)
        has_host = host != 0
        if img.has_data_file:  # as in entry_kinds
            zero_flag = ((d & np.uint64(OFLAG_ZERO)) != 0) & (b is None)
            has_host |= ~is_c & ~zero_flag & ((d & np.uint64(OFLAG_COPIED)) != 0)
        if b is not None:
            b = b[:n]
            alloc_bits = b & np.uint64(0xFFFFFFFF)
            is_z = ((b >> np.uint64(32)) == np.uint64(0xFFFFFFFF)) & ~is_c
            is_n = has_host & (alloc_bits != 0)
            sub_alloc += _popcount(alloc_bits)
            sub_zero += _popcount(b >> np.uint64(32))
        else:
            is_z = ((d & np.uint64(OFLAG_ZERO)) != 0) & ~is_c
            is_n = has_host & ~is_z
        normal += int(is_n.sum())
        zero += int(is_z.sum())
        compressed += int(is_c.sum())
        hosts = host[is_n]
        if hosts.size:
            breaks = int(np.count_nonzero(np.diff(hosts) != cs))
            runs += breaks + (0 if last_host is not None and int(hosts[0]) == last_host + cs else 1)
            last_host = int(hosts[-1])
            normal_total += hosts.size
    refblocks = int(img.refblock_present.sum())
    metadata = cs + h.l1_size * 8 + tables * cs + h.refcount_table_clusters * cs + refblocks * cs
    default = resolve_cache(g)
    info = {
        "path": path,
        "version": h.version,
        "virtual_size": g.virtual_size,
        "cluster_size": cs,
        "extended_l2": g.extended_l2,
        "refcount_bits": g.refcount_bits,
        "compression_type": "zstd" if h.compression_type == 1 else "zlib",
        "backing_file": h.backing_file,
        "backing_format": h.backing_format,
        "data_file": h.data_file,
        "encrypted": bool(h.crypt_method),
        "snapshots": h.nb_snapshots,
        "dirty": bool(h.incompatible_features & 1),
        "corrupt": bool(h.incompatible_features & 2),
        "file_bytes": img.file_bytes,
        "l1_entries": h.l1_size,
        "l1_entries_used": tables,
        "l2_tables": tables,
        "clusters": g.clusters,
        "clusters_allocated": normal,
        "clusters_zero": zero,
        "clusters_compressed": compressed,
        "clusters_unallocated": int(g.clusters - normal - zero - compressed),
        "host_runs": runs,
        "fragmented_share": (runs - 1) / max(normal_total - 1, 1) if runs else 0.0,
        "refcount_table_bytes": h.refcount_table_clusters * cs,
        "refcount_blocks": refblocks,
        "metadata_bytes": metadata,
        "metadata_share_of_file": metadata / img.file_bytes if img.file_bytes else 0.0,
        "l2_cache_for_allocated_tables": tables * cs,
        "full_l2_cache_bytes": g.full_l2_cache_bytes,
        "default_l2_cache_bytes": default.l2_cache_bytes,
        "default_l2_cache_entries": default.l2_cache_entries,
        "default_l2_cache_entry_size": default.l2_cache_entry_size,
        "default_covers_allocated_tables": default.l2_cache_ram_bytes >= tables * cs,
        "warnings": list(img.warnings),
        "backing_chain": backing_chain(img),
    }
    if g.extended_l2:
        info["subclusters_allocated"] = sub_alloc
        info["subclusters_zero"] = sub_zero
    img.close()
    return info


def backing_chain(img: Qcow2Image) -> list[dict]:
    """Each backing file below the image (name resolved as QEMU resolves it), with its format and size; where QEMU
    could not open the chain, a last entry says why (``error``) instead of failing the whole inspection."""
    chain: list[dict] = []
    try:
        for link, opened in walk_chain(img):
            size = opened.header.size if opened is not None else os.stat(link.path).st_size
            chain.append({"path": link.path, "format": link.format, "readable": True, "virtual_size": size})
    except BackingError as exc:
        chain.append({"path": exc.path or "(not a local file)", "format": exc.format,
                      "readable": bool(exc.path) and os.access(exc.path, os.R_OK), "error": str(exc)})
    return chain


# --- qemu-img map -------------------------------------------------------------------------------------------------

def qemu_img_version(qemu_img: str | None = None) -> tuple[int, int]:
    """The version of ``qemu-img`` (or the one on PATH); 7.2 when there is none."""
    tool = qemu_img or shutil.which("qemu-img")
    if tool is None:
        return (7, 2)
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (7, 2)
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (7, 2)


def parse_version(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)?", text.strip())
    if not m:
        raise QsimError(f"QEMU version {text!r}: expected MAJOR.MINOR, e.g. 7.2 or 10.0", status=2)
    return int(m.group(1)), int(m.group(2))


def _image_runs(img: Qcow2Image) -> Iterator[tuple[int, int, int, int]]:
    """(start, length, kind, host) runs of one qcow2 image alone, in guest order, covering the whole disk."""
    g = img.geometry
    unit = g.subcluster_size if g.extended_l2 else g.cluster_size
    table_span = g.l2_entries_per_table * g.cluster_size
    pos = 0
    for index, _, d, b in img.iter_tables():
        first = index * table_span
        if first > pos:
            yield pos, first - pos, UNALLOCATED, 0
        kind, host = entry_kinds(img, index, d, b)
        n = min(len(kind), -(-(g.virtual_size - first) // unit))
        kind, host = kind[:n], host[:n]
        starts = first + np.arange(n, dtype=np.int64) * unit
        new = np.ones(n, bool)
        with_host = np.isin(kind, WITH_HOST)
        new[1:] = (kind[1:] != kind[:-1]) | (with_host[1:] & (host[1:] != host[:-1] + unit))
        heads = np.flatnonzero(new)
        ends = np.append(starts[heads[1:]], min(first + n * unit, g.virtual_size))
        for a, e in zip(heads.tolist(), ends.tolist()):
            yield int(starts[a]), e - int(starts[a]), int(kind[a]), int(host[a])
        pos = int(ends[-1]) if n else first
    if pos < g.virtual_size:
        yield pos, g.virtual_size - pos, UNALLOCATED, 0


def _host_holes(fd: int, start: int, length: int, host: int):
    """Split a data extent where the file has holes (SEEK_DATA / SEEK_HOLE: reads nothing, changes nothing)."""
    pos, end = host, host + length
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole from here to the end of the file
            data = end
        if data > pos:
            stop = min(data, end)
            yield start + pos - host, stop - pos, pos, True
            pos = stop
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        yield start + pos - host, hole - pos, pos, False
        pos = hole


def looks_metadata_preallocated(img: Qcow2Image) -> bool:
    """qcow2_detect_metadata_preallocation: the refcounts claim clearly more clusters than the host file has
    allocated (st_blocks), so QEMU's block status also asks the file which data reads as zeroes. Counted one
    refcount block at a time, stopping at the threshold, as QEMU does."""
    cs = img.geometry.cluster_size
    real_clusters = os.stat(img.path).st_blocks * 512 // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    used = 0
    for _, values in img.refcount_runs():
        used += int(np.count_nonzero(values))
        if used >= threshold:
            return True
    return False


class _Layer:
    """One image of the chain as ``qemu-img map`` sees it: its extents, and the layer below."""

    def __init__(self, path: str, fmt: str, img: Qcow2Image | None, depth: int, below: "_Layer | None"):
        self.path, self.format, self.img, self.depth, self.below = path, fmt, img, depth, below
        if img is not None:
            self.size = img.header.size // 512 * 512  # QEMU sees whole sectors (bs->total_sectors)
            self.data_path = img.data_file or path
        elif fmt == "raw":
            self.size = os.stat(path).st_size // 512 * 512
            self.data_path = path
        else:
            raise QsimError(f"{path}: backing format {fmt} is not mapped by qsim (qcow2 and raw are)")

    @classmethod
    def chain(cls, path: str) -> "_Layer":
        """The image at ``path`` and every layer below it (walk_chain's rules), linked top to bottom."""
        top = open_image(path)
        layers = [(path, "qcow2", top)] + [(link.path, link.format, opened) for link, opened in walk_chain(top)]
        below = None
        for depth in range(len(layers) - 1, -1, -1):
            below = cls(*layers[depth], depth, below)
        assert below is not None
        return below

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool, bool, bool, bool, int | None, int]]:
        """(start, length, present, zero, data, compressed, offset or None, depth) for [start, end)."""
        if self.img is None:  # raw: the file's own data and holes, offset = guest offset
            fd = open_regular(self.data_path, "backing file")
            try:
                for s, n, host, hole in _host_holes(fd, start, min(end, self.size) - start, start):
                    yield s, n, True, hole, not hole, False, host, self.depth
            finally:
                os.close(fd)
            return
        recurse = looks_metadata_preallocated(self.img)
        fd = open_regular(self.data_path, "data file") if recurse else -1
        try:
            for s, n, kind, host in _clip(_image_runs(self.img), start, end):
                if kind in (DATA, ZERO, ZERO_AT, COMPRESSED_DATA):
                    offset = host if kind in WITH_HOST else None
                    if kind == DATA and recurse:
                        for ps, pn, ph, hole in _host_holes(fd, s, n, host):
                            yield ps, pn, True, hole, True, False, ph, self.depth
                    else:
                        yield s, n, True, kind in (ZERO, ZERO_AT), kind in (DATA, COMPRESSED_DATA), \
                            kind == COMPRESSED_DATA, offset, self.depth
                    continue
                offset = host if kind == UNALLOCATED_AT else None
                if self.below is None:
                    yield s, n, False, True, False, False, offset, self.depth
                    continue
                inside = max(0, min(s + n, self.below.size) - s)
                if inside:
                    yield from self.below.runs(s, s + inside)  # QEMU asks the backing file; its answer counts
                if inside < n:  # beyond the end of the backing file: reads as zeroes, from this layer
                    yield s + inside, n - inside, False, True, False, False, offset, self.depth
        finally:
            if fd >= 0:
                os.close(fd)


def _clip(runs, start: int, end: int):
    for s, n, kind, host in runs:
        if s + n <= start:
            continue
        if s >= end:
            break
        a, e = max(s, start), min(s + n, end)
        yield a, e - a, kind, host + (a - s) if kind in WITH_HOST else host


def guest_map(path: str, qemu_version: tuple[int, int] | None = None) -> Iterator[dict]:
    """Guest -> host extents exactly as ``qemu-img map --output=json`` prints them (backing files included, at
    their depth; subcluster-exact with extended_l2), one dict at a time. ``qemu_version`` picks the keys (7.2 has
    no ``compressed``); default: the qemu-img on PATH."""
    version = qemu_version or qemu_img_version()
    with_compressed = version >= COMPRESSED_KEY_SINCE
    top = _Layer.chain(path)
    current = None
    for s, n, present, zero, data, compressed, offset, depth in top.runs(0, top.size):
        if n <= 0:
            continue
        if current is not None and (current["present"], current["zero"], current["data"], current["depth"],
                                    current.get("compressed"), "offset" in current) == (
                present, zero, data, depth, compressed if with_compressed else None, offset is not None) and (
                offset is None or current["offset"] + current["length"] == offset):
            current["length"] += n
            continue
        if current is not None:
            yield current
        current = {"start": s, "length": n, "depth": depth, "present": present, "zero": zero, "data": data}
        if with_compressed:
            current["compressed"] = compressed
        if offset is not None:
            current["offset"] = offset
    if current is None:  # a zero-length disk: qemu-img prints its empty first entry
        current = {"start": 0, "length": 0, "depth": 0, "present": False, "zero": False, "data": False}
        if with_compressed:
            current["compressed"] = False
    yield current


def format_map_entry(e: dict) -> str:
    """One entry as qemu-img's dump_map_entry prints it (without the separator)."""
    text = ", ".join(f'"{k}": {_json_value(e[k])}' for k in ("start", "length", "depth", "present", "zero", "data",
                                                               "compressed", "offset") if k in e)
    return "{ " + text + "}"


def _json_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)
