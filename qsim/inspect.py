"""``qsim inspect``: what a real qcow2 image holds, how its data is laid out, and the L2 cache it needs."""

from __future__ import annotations

import os

import numpy as np

from .cachecfg import resolve_cache
from .errors import QsimError
from .qcow2 import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO, Qcow2Image, open_image

MAX_CHAIN = 16


def _popcount32(values: np.ndarray) -> int:
    return int(np.unpackbits(values.astype(">u4").view(np.uint8)).sum()) if values.size else 0


def classify(img: Qcow2Image) -> dict[str, np.ndarray]:
    """Per entry of every allocated table: normal (data at a host offset), zero, compressed (boolean arrays)."""
    d = img.l2_descriptors
    compressed = (d & np.uint64(OFLAG_COMPRESSED)) != 0
    host = np.where(compressed, 0, d & np.uint64(L2E_OFFSET_MASK))
    if img.geometry.extended_l2:
        zero_bits = img.l2_bitmaps >> np.uint64(32)
        alloc_bits = img.l2_bitmaps & np.uint64(0xFFFFFFFF)
        zero = (zero_bits == np.uint64(0xFFFFFFFF)) & ~compressed
        normal = (host != 0) & (alloc_bits != 0)
    else:
        zero = ((d & np.uint64(OFLAG_ZERO)) != 0) & ~compressed
        normal = (host != 0) & ~zero
    return {"host": host, "normal": normal, "zero": zero, "compressed": compressed}


def inspect_image(path: str) -> dict:
    """The facts ``qsim inspect`` prints, as a plain dict (sizes in bytes)."""
    img = open_image(path)
    h, g = img.header, img.geometry
    c = classify(img)
    cs = g.cluster_size
    normal_hosts = c["host"][c["normal"]].astype(np.int64)  # guest order: tables in L1 order, entries in order
    runs = int(1 + np.count_nonzero(np.diff(normal_hosts) != cs)) if normal_hosts.size else 0
    refblocks = int(img.refblock_present.sum())
    metadata = cs + h.l1_size * 8 + len(img.l2_tables) * cs + h.refcount_table_clusters * cs + refblocks * cs
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
        "l1_entries_used": int(len(img.l2_tables)),
        "l2_tables": int(len(img.l2_tables)),
        "clusters": g.clusters,
        "clusters_allocated": int(c["normal"].sum()),
        "clusters_zero": int(c["zero"].sum()),
        "clusters_compressed": int(c["compressed"].sum()),
        "clusters_unallocated": int(g.clusters - c["normal"].sum() - c["zero"].sum() - c["compressed"].sum()),
        "host_runs": runs,
        "fragmented_share": (runs - 1) / max(int(normal_hosts.size) - 1, 1) if runs else 0.0,
        "refcount_table_bytes": h.refcount_table_clusters * cs,
        "refcount_blocks": refblocks,
        "metadata_bytes": metadata,
        "metadata_share_of_file": metadata / img.file_bytes if img.file_bytes else 0.0,
        "l2_cache_for_allocated_tables": int(len(img.l2_tables)) * cs,
        "full_l2_cache_bytes": g.full_l2_cache_bytes,
        "default_l2_cache_bytes": default.l2_cache_bytes,
        "default_l2_cache_entries": default.l2_cache_entries,
        "default_l2_cache_entry_size": default.l2_cache_entry_size,
        "default_covers_allocated_tables": default.l2_cache_ram_bytes >= len(img.l2_tables) * cs,
        "warnings": list(img.warnings),
        "backing_chain": backing_chain(img),
    }
    if g.extended_l2:
        info["subclusters_allocated"] = _popcount32(img.l2_bitmaps & np.uint64(0xFFFFFFFF))
        info["subclusters_zero"] = _popcount32(img.l2_bitmaps >> np.uint64(32))
    return info


def backing_chain(img: Qcow2Image) -> list[dict]:
    """Each backing file below the image (name resolved relative to the image's folder), with its format."""
    chain, seen = [], {os.path.realpath(img.path)}
    current = img
    while current is not None and current.header.backing_file and len(chain) < MAX_CHAIN:
        name = current.header.backing_file
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(current.path), name)
        entry = {"path": path, "format": current.header.backing_format, "readable": os.access(path, os.R_OK)}
        chain.append(entry)
        if os.path.realpath(path) in seen:
            entry["error"] = "loop in the backing chain"
            break
        seen.add(os.path.realpath(path))
        current = None
        if entry["readable"] and entry["format"] in (None, "qcow2"):
            try:
                current = open_image(path)
                entry["format"] = "qcow2"
                entry["virtual_size"] = current.header.size
            except QsimError as exc:
                entry["error"] = str(exc)
        elif entry["readable"]:
            entry["virtual_size"] = os.path.getsize(path)
    return chain


DATA, ZERO, COMPRESSED_DATA, UNALLOCATED, UNALLOCATED_AT, ZERO_AT = 1, 2, 3, 0, 4, 5


def guest_map(path: str) -> list[dict]:
    """Guest -> host extents as ``qemu-img map --output=json`` prints them for this image (depth 0): runs of data
    (host-contiguous), zeroes, compressed data and unallocated space; subcluster-exact with extended_l2."""
    img = open_image(path)
    g = img.geometry
    cs = g.cluster_size
    c = classify(img)
    entries = g.l2_entries_per_table
    keep = img.l2_tables < g.l1_entries
    first_cluster = (img.l2_tables[keep][:, None] * entries + np.arange(entries)).reshape(-1)
    host = c["host"][keep].reshape(-1).astype(np.int64)
    zero = c["zero"][keep].reshape(-1)
    kind = np.select([c["normal"][keep].reshape(-1), zero & (host != 0), zero, c["compressed"][keep].reshape(-1)],
                     [DATA, ZERO_AT, ZERO, COMPRESSED_DATA], UNALLOCATED)
    unit = cs
    starts = first_cluster * cs
    if g.extended_l2:  # expand to subclusters: allocated / zero / unallocated (with a host offset or not)
        spc = g.subclusters_per_cluster
        unit = g.subcluster_size
        bitmaps = img.l2_bitmaps[keep].reshape(-1)
        sc = np.arange(spc, dtype=np.uint64)
        alloc = ((bitmaps[:, None] >> sc) & np.uint64(1)).astype(bool)
        zero = ((bitmaps[:, None] >> (sc + np.uint64(32))) & np.uint64(1)).astype(bool)
        has_host = (host != 0)[:, None]
        sub_kind = np.select([zero & has_host, alloc & has_host, zero, has_host], [ZERO_AT, DATA, ZERO, UNALLOCATED_AT],
                             UNALLOCATED)
        sub_kind = np.where((kind == COMPRESSED_DATA)[:, None], COMPRESSED_DATA, sub_kind)
        kind = sub_kind.reshape(-1)
        starts = (starts[:, None] + np.arange(spc) * unit).reshape(-1)
        host = np.where(host[:, None] != 0, host[:, None] + np.arange(spc) * unit, 0).reshape(-1)
    inside = starts < g.virtual_size
    kind, starts, host = kind[inside], starts[inside], host[inside]
    # Segments are the table entries plus the gaps between allocated tables (unallocated); merge neighbours.
    seg_start = np.concatenate([starts, [0], starts + unit])
    seg_kind = np.concatenate([kind, [UNALLOCATED], np.full(len(kind), -1)])
    order = np.argsort(seg_start, kind="stable")
    seg_start, seg_kind = seg_start[order], seg_kind[order]
    seg_host = np.concatenate([host, [0], np.zeros(len(kind), np.int64)])[order]
    # A -1 marker is the end of an entry: if nothing starts there, unallocated space begins there.
    is_marker = seg_kind == -1
    starts_here = np.zeros(len(seg_start), bool)
    starts_here[:-1] = seg_start[1:] == seg_start[:-1]
    drop = is_marker & (starts_here | (seg_start >= g.virtual_size))
    seg_start, seg_kind, seg_host = seg_start[~drop], seg_kind[~drop], seg_host[~drop]
    seg_kind = np.where(seg_kind == -1, UNALLOCATED, seg_kind)
    seg_start, index = np.unique(seg_start, return_index=True)
    seg_kind, seg_host = seg_kind[index], seg_host[index]
    seg_end = np.append(seg_start[1:], g.virtual_size)
    with_host = (seg_kind == DATA) | (seg_kind == UNALLOCATED_AT) | (seg_kind == ZERO_AT)
    contiguous = np.zeros(len(seg_start), bool)
    contiguous[1:] = (seg_kind[1:] == seg_kind[:-1]) & (
        ~with_host[1:] | (seg_host[1:] == seg_host[:-1] + (seg_start[1:] - seg_start[:-1])))
    run_first = np.flatnonzero(~contiguous)
    run_last = np.append(run_first[1:] - 1, len(seg_start) - 1)
    out: list[dict] = []
    recurse = looks_metadata_preallocated(img)
    fd = os.open(path, os.O_RDONLY)
    try:
        for a, b in zip(run_first.tolist(), run_last.tolist()):
            k = int(seg_kind[a])
            start, length = int(seg_start[a]), int(seg_end[b] - seg_start[a])
            base = {"depth": 0, "present": k in (DATA, ZERO, ZERO_AT, COMPRESSED_DATA),
                    "zero": k in (ZERO, ZERO_AT, UNALLOCATED, UNALLOCATED_AT), "data": k in (DATA, COMPRESSED_DATA),
                    "compressed": k == COMPRESSED_DATA}
            if k == DATA and recurse:  # QEMU then asks the file too: data in a host hole reads as zeroes
                for part_start, part_length, host_offset, hole in _host_holes(fd, start, length, int(seg_host[a])):
                    _append(out, dict(start=part_start, length=part_length, **base, offset=host_offset) | {
                        "zero": hole})
            elif k in (DATA, UNALLOCATED_AT, ZERO_AT):
                _append(out, dict(start=start, length=length, **base, offset=int(seg_host[a])))
            else:
                _append(out, dict(start=start, length=length, **base))
    finally:
        os.close(fd)
    return [{key: e[key] for key in ("start", "length", "depth", "present", "zero", "data", "compressed", "offset")
             if key in e} for e in out]


def looks_metadata_preallocated(img: Qcow2Image) -> bool:
    """qcow2_detect_metadata_preallocation: the refcounts claim clearly more clusters than the host file has
    allocated (st_blocks), so QEMU's block status also asks the file which data reads as zeroes."""
    cs = img.geometry.cluster_size
    real_clusters = os.stat(img.path).st_blocks * 512 // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    return int(np.count_nonzero(img.refcounts)) >= threshold


def _host_holes(fd: int, start: int, length: int, host: int):
    """Split a data extent where the image file has holes (SEEK_DATA / SEEK_HOLE: reads nothing, changes nothing)."""
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


def _append(out: list[dict], entry: dict) -> None:
    """Add an extent, merging it into the previous one when QEMU would print them as one."""
    if out:
        last = out[-1]
        same = all(last.get(k) == entry.get(k) for k in ("present", "zero", "data", "compressed", "depth"))
        joined = ("offset" in last) == ("offset" in entry) and (
            "offset" not in entry or last["offset"] + last["length"] == entry["offset"])
        if same and joined and last["start"] + last["length"] == entry["start"]:
            last["length"] += entry["length"]
            return
    out.append(entry)
