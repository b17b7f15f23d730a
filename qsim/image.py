"""Building image states: synthetic ones the way QEMU builds them, and real ones from a qcow2 file.

``qemu-img create`` allocates the header, refcount table and block, then the L1 table, then
(preallocation=metadata) every L2 table and cluster through the same allocation code a guest write uses; so the
synthetic states are built by running qsim's own QEMU model (``qsim.engine``) with event recording off, and host
offsets come out where QEMU puts them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from . import hostalloc
from .cachecfg import resolve_cache
from .codes import F_COMPRESSED, F_COPIED, F_ZERO, PREALLOC, WRITE
from .engine import run_kernel
from .errors import QsimError
from .geometry import ImageGeometry
from .imageopts import ImageOptions
from .imagestate import SLOT_NONE, ImageState, as_opened, fresh_image
from .trace import Trace

def build_image(geometry: ImageGeometry, options: ImageOptions = ImageOptions()) -> ImageState:
    """The image state named by ``-o`` options: preallocation=off|metadata, or fill=SHARE (seeded)."""
    state = fresh_image(geometry, options.backing)
    if options.preallocation == "metadata":
        # preallocate_co runs on the image qemu-img create just opened, with that open's default slice size.
        creation = resolve_cache(geometry)
        state = run_kernel(state, _prealloc_requests(geometry), creation.l2_cache_entry_size, record=False,
                           reopen=True).image
        return _describe(as_opened(state, state.clusters_allocated), "preallocation=metadata")
    if options.fill > 0:
        state = run_kernel(state, _fill_requests(geometry, options.fill, options.seed),
                           min(geometry.cluster_size, 4096), record=False, reopen=True).image
        return _describe(as_opened(state, 0), f"fill={options.fill:g},seed={options.seed}")
    return state


def _describe(state: ImageState, text: str) -> ImageState:
    return replace(state, description=text)


def _prealloc_requests(geometry: ImageGeometry):
    size = geometry.virtual_size
    step = (2**31 - 1) // geometry.cluster_size * geometry.cluster_size
    offsets = np.arange(0, size, step, dtype=np.int64)
    lengths = np.minimum(step, size - offsets)
    return Trace(np.full(len(offsets), PREALLOC, np.uint8), offsets, lengths.astype(np.uint32))


def _fill_requests(geometry: ImageGeometry, share: float, seed: int):
    """Whole-cluster writes to a random ``share`` of the clusters, in random order: a disk that has been in use."""
    clusters = geometry.clusters
    count = int(round(share * clusters))
    if count > 50_000_000:
        raise QsimError(f"fill={share:g} would write {count} clusters; use a larger cluster size or a smaller share")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(clusters, size=count, replace=False).astype(np.int64)
    offsets = chosen * geometry.cluster_size
    lengths = np.minimum(geometry.cluster_size, geometry.virtual_size - offsets)
    return Trace(np.full(count, WRITE, np.uint8), offsets, lengths.astype(np.uint32))


def record_file_at_open(alloc: np.ndarray, path: str, cluster_size: int) -> None:
    """What QEMU's one-time preallocation scan reads of the image file it opens (``path``): its allocated bytes
    (st_blocks x 512, which depend on the filesystem) and its length in clusters, into the allocator state."""
    info = os.stat(path)
    alloc[hostalloc.ALLOCATED_AT_OPEN] = info.st_blocks * 512
    alloc[hostalloc.FILE_CLUSTERS_AT_OPEN] = -(-info.st_size // cluster_size)


def image_from_qcow2(img) -> ImageState:
    """The state of a real image read by ``qsim.qcow2.open_image``: its tables, entries, host layout and refcounts."""
    from .qcow2 import COMPILED_MIN_ENTRIES, L2E_OFFSET_MASK

    g = img.geometry
    cb = img.header.cluster_bits
    n_l1 = g.l1_entries
    keep = img.l2_tables < n_l1
    tables = img.l2_tables[keep]
    d = img.l2_descriptors if keep.all() else img.l2_descriptors[keep]  # (no 8-byte-per-entry copy when all fit)
    file_clusters = img.file_clusters
    decoded = None
    if not img.has_data_file and d.size >= COMPILED_MIN_ENTRIES:  # (a small image needs no numba start-up)
        from .qcow2scan import decode_plain_entries

        decoded = decode_plain_entries(d, cb, file_clusters, g.extended_l2)
    host, flags = decoded if decoded is not None else _decode_entries(img, d, tables, file_clusters)
    table_slot = np.full(n_l1, SLOT_NONE, dtype=np.int32)
    table_slot[tables] = np.arange(len(tables), dtype=np.int32)
    l1_offsets = img.l1[tables] & np.uint64(L2E_OFFSET_MASK)
    bitmap = img.l2_bitmaps[keep].copy() if g.extended_l2 else np.zeros((1, 1), dtype=np.uint64)
    alloc = hostalloc.new_alloc_state(g.cluster_size, g.refcount_bits)
    alloc[hostalloc.REFTABLE_ENTRIES] = img.header.refcount_table_clusters * g.cluster_size // 8
    alloc[hostalloc.REFTABLE_CLUSTER] = img.header.refcount_table_offset // g.cluster_size
    used = img.host_used
    alloc[hostalloc.HIGH_WATER] = len(used) - int(np.argmax(used[::-1])) if used.any() else 0  # (last used + 1)
    record_file_at_open(alloc, img.path, g.cluster_size)
    return ImageState(
        geometry=g,
        n_tables=len(tables),
        table_slot=table_slot,
        table_host=(l1_offsets >> np.uint64(cb)).astype(np.int64),
        entry_host=host,
        entry_flags=flags,
        entry_bitmap=bitmap,
        host_used=used,
        refblock_covered=img.refblock_present.copy(),
        alloc_state=alloc,
        has_backing_file=bool(img.header.backing_file),
        description=f"image {os.path.basename(img.path)}",
        has_data_file=img.has_data_file,
    )


def _decode_entries(img, d: np.ndarray, tables: np.ndarray, file_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(host cluster, codes.F_* flags) of every L2 entry, compressed ones and external data files included; a data
    cluster past the end of the file is refused."""
    from .qcow2 import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO

    g = img.geometry
    cb = img.header.cluster_bits
    compressed = (d & np.uint64(OFLAG_COMPRESSED)) != 0
    host = ((d & np.uint64(L2E_OFFSET_MASK)) >> np.uint64(cb)).astype(np.int64)
    copied = (d >> np.uint64(63)).astype(np.uint8)  # (OFLAG_COPIED is bit 63)
    flags = copied * np.uint8(F_COPIED)
    if compressed.any():  # a compressed entry's host field is its byte offset and sector count
        x = 62 - (cb - 8)
        compressed_host = ((d & np.uint64((1 << x) - 1)) >> np.uint64(cb)).astype(np.int64)
        host = np.where(compressed, np.maximum(compressed_host, 1), host)
        flags |= np.where(compressed, np.uint8(F_COMPRESSED), np.uint8(0))
    if img.has_data_file:
        # qcow2_get_cluster_type: offset 0 is data-file offset 0 when QCOW_OFLAG_COPIED says the cluster is
        # allocated (a zero flag without extended_l2 comes first: zero, plain); the reader has checked that every
        # data cluster sits at its guest offset, and data offsets are not bounded by the image file
        zero_flag = ((d & np.uint64(OFLAG_ZERO)) != 0) & (not g.extended_l2)
        allocated = (host != 0) | ((copied != 0) & ~zero_flag)
        host = np.where(allocated, host + 1, 0)  # stage1.entries.data_file_host
        beyond = np.zeros(host.shape, dtype=bool)
    else:
        beyond = (host >= file_clusters) & ~compressed
    if beyond.any():
        row, col = (int(v[0]) for v in np.nonzero(beyond))
        raise QsimError(f"{img.path}: L2 entry {col} of the table for L1 entry {tables[row]} points at host offset "
                        f"{int(host[row, col]) << cb:#x}, past the end of the file")
    if not g.extended_l2:
        flags |= (d & np.uint64(OFLAG_ZERO)).astype(np.uint8) * np.uint8(F_ZERO)  # (OFLAG_ZERO is bit 0)
    return host, flags


@dataclass(frozen=True)
class ChainLayer:
    """One backing file below an image, as QEMU opens it: its path (the name resolved against the folder of the
    image that names it), its format (``qcow2`` or ``raw``) and size; ``state`` for a qcow2 layer."""

    path: str
    format: str
    virtual_size: int
    state: ImageState | None = None


def backing_chain(img) -> tuple[ChainLayer, ...]:
    """Every backing file below a real image read by ``qsim.qcow2.open_image``, nearest first, down to an image
    without one or a raw file (raw has no backing file). QsimError where QEMU would fail to open the chain (a
    missing or unreadable file, a loop) or where qsim cannot model a layer (another format, a protocol name)."""
    from .backing import walk_chain

    layers: list[ChainLayer] = []
    for link, opened in walk_chain(img):
        if opened is not None:
            layers.append(ChainLayer(link.path, link.format, opened.header.size, image_from_qcow2(opened)))
        elif link.format == "raw":
            # bdrv_getlength: whole 512-byte sectors (refresh_total_sectors rounds the file's length up)
            layers.append(ChainLayer(link.path, link.format, -(-os.path.getsize(link.path) // 512) * 512))
        else:
            raise QsimError(f"{link.parent}: backing file {link.name} is {link.format}; qsim models qcow2 and raw "
                            "backing files")
    for k, layer in enumerate(layers[:-1]):  # each qcow2 layer reads zeroes past the end of the one below it
        layers[k] = replace(layer, state=replace(layer.state, backing_size=layers[k + 1].virtual_size))
    return tuple(layers)
