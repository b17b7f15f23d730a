"""ImageState: what a qcow2 image has allocated -- L2 tables, clusters, subclusters and host layout.

One plain type for synthetic images (fresh, metadata-preallocated, partly filled) and, later, real ones read from
disk. Synthetic states are built the way QEMU builds them -- ``qemu-img create`` allocates the header, refcount
table and block, then the L1 table, then (preallocation=metadata) every L2 table and cluster through the same
allocation code a guest write uses -- by running qsim's own QEMU model with event recording off, so host offsets come
out where QEMU puts them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import hostalloc
from .cachecfg import resolve_cache
from .errors import QsimError
from .geometry import L1_ENTRY_BYTES, ImageGeometry
from .imageopts import ImageOptions

SLOT_NONE = -1


@dataclass(frozen=True, eq=False)
class ImageState:
    """Allocation state of one image. Arrays (one row per L2 table, in slot order; tables are numbered by slot):

    - ``table_slot`` int32 [L1 entries]: slot of the L2 table of each L1 entry, -1 when there is none
    - ``table_host`` int64 [slots]: host cluster index of each L2 table
    - ``entry_host`` int64 [slots, entries per table]: host cluster index of each guest cluster, 0 = none
    - ``entry_flags`` uint8 [slots, entries]: events.F_ZERO / F_COMPRESSED / F_COPIED
    - ``entry_bitmap`` uint64 [slots, entries]: extended_l2 subcluster bitmap, QEMU's layout (bits 0-31 allocated,
      32-63 reads as zero); a [1, 1] placeholder without extended_l2
    - ``host_used`` uint8 [host clusters]: refcount > 0; ``refblock_covered`` uint8 [refcount blocks]
    - ``alloc_state`` int64: hostalloc state (free index, refcount block size, ...)
    """

    geometry: ImageGeometry
    n_tables: int
    table_slot: np.ndarray
    table_host: np.ndarray
    entry_host: np.ndarray
    entry_flags: np.ndarray
    entry_bitmap: np.ndarray
    host_used: np.ndarray
    refblock_covered: np.ndarray
    alloc_state: np.ndarray
    backing: bool = False
    description: str = ""

    @property
    def clusters_allocated(self) -> int:
        return int(np.count_nonzero(self.entry_host[: self.n_tables]))

    @property
    def file_bytes(self) -> int:
        """Image file size: one past the last used host cluster."""
        return int(self.alloc_state[hostalloc.HIGH_WATER]) * self.geometry.cluster_size

    def with_capacity(self, extra_tables: int, extra_host_clusters: int) -> ImageState:
        """A copy with room for more tables and host clusters, ready to be changed by a replay."""
        rows = self.n_tables + extra_tables
        entries = self.entry_host.shape[1]
        ext_shape = (rows, entries) if self.geometry.extended_l2 else (1, 1)

        def grow(a: np.ndarray, shape, dtype):
            out = np.zeros(shape, dtype=dtype)
            if a.ndim == 2 and a.shape[1] == shape[1] and shape[1] > 1:  # not the [1, 1] placeholder
                out[: self.n_tables] = a[: self.n_tables]
            elif a.ndim == 1:
                out[: min(len(a), len(out))] = a[: min(len(a), len(out))]
            return out

        host_clusters = int(self.alloc_state[hostalloc.HIGH_WATER]) + extra_host_clusters + 1024
        refblock_bits = int(self.alloc_state[hostalloc.REFBLOCK_BITS])
        return ImageState(
            geometry=self.geometry,
            n_tables=self.n_tables,
            table_slot=self.table_slot.copy(),
            table_host=grow(self.table_host, (rows,), np.int64),
            entry_host=grow(self.entry_host, (rows, entries), np.int64),
            entry_flags=grow(self.entry_flags, (rows, entries), np.uint8),
            entry_bitmap=grow(self.entry_bitmap, ext_shape, np.uint64),
            host_used=grow(self.host_used, (max(host_clusters, len(self.host_used)),), np.uint8),
            refblock_covered=grow(self.refblock_covered, ((host_clusters >> refblock_bits) + 2,), np.uint8),
            alloc_state=self.alloc_state.copy(),
            backing=self.backing,
            description=self.description,
        )


def fresh_image(geometry: ImageGeometry, backing: bool = False) -> ImageState:
    """``qemu-img create -f qcow2`` (preallocation=off): header, refcount table and block, L1 table; no L2 tables."""
    geometry.check_l1_size()
    entries = geometry.l2_entries_per_table
    l1_clusters = -(-geometry.l1_entries * L1_ENTRY_BYTES // geometry.cluster_size)
    alloc = hostalloc.new_alloc_state(geometry.cluster_size, geometry.refcount_bits)
    host_clusters = 3 + l1_clusters + 64
    refblock_bits = int(alloc[hostalloc.REFBLOCK_BITS])
    used = np.zeros(host_clusters, dtype=np.uint8)
    covered = np.zeros((host_clusters >> refblock_bits) + 2, dtype=np.uint8)
    covered[0] = 1  # qcow2_co_create writes refcount block 0 at cluster 2, before anything is allocated
    hostalloc.alloc_clusters(used, covered, alloc, 3)  # header, refcount table, refcount block
    if l1_clusters:
        hostalloc.alloc_clusters(used, covered, alloc, l1_clusters)
    alloc[hostalloc.FREE_INDEX] = 0  # the image is opened afresh
    return ImageState(
        geometry=geometry,
        n_tables=0,
        table_slot=np.full(geometry.l1_entries, SLOT_NONE, dtype=np.int32),
        table_host=np.zeros(0, dtype=np.int64),
        entry_host=np.zeros((0, entries), dtype=np.int64),
        entry_flags=np.zeros((0, entries), dtype=np.uint8),
        entry_bitmap=np.zeros((1, 1), dtype=np.uint64),
        host_used=used,
        refblock_covered=covered,
        alloc_state=alloc,
        backing=backing,
        description="preallocation=off",
    )


def build_image(geometry: ImageGeometry, options: ImageOptions = ImageOptions()) -> ImageState:
    """The image state named by ``-o`` options: preallocation=off|metadata, or fill=SHARE (seeded)."""
    from .engine import run_kernel  # the engine runs the QEMU model; image states come from it

    state = fresh_image(geometry, options.backing)
    if options.preallocation == "metadata":
        # preallocate_co runs on the image qemu-img create just opened, with that open's default slice size.
        creation = resolve_cache(geometry)
        state = run_kernel(state, _prealloc_requests(geometry), creation.l2_cache_entry_size, record=False,
                           reopen=True).image
        return _describe(state, "preallocation=metadata")
    if options.fill > 0:
        state = run_kernel(state, _fill_requests(geometry, options.fill, options.seed),
                           min(geometry.cluster_size, 4096), record=False, reopen=True).image
        return _describe(state, f"fill={options.fill:g},seed={options.seed}")
    return state


def _describe(state: ImageState, text: str) -> ImageState:
    from dataclasses import replace

    return replace(state, description=text)


def _prealloc_requests(geometry: ImageGeometry):
    from .events import OP_PREALLOC
    from .trace import Trace

    size = geometry.virtual_size
    step = (2**31 - 1) // geometry.cluster_size * geometry.cluster_size
    offsets = np.arange(0, size, step, dtype=np.int64)
    lengths = np.minimum(step, size - offsets)
    return Trace(np.full(len(offsets), OP_PREALLOC, np.uint8), offsets, lengths.astype(np.uint32))


def _fill_requests(geometry: ImageGeometry, share: float, seed: int):
    """Whole-cluster writes to a random ``share`` of the clusters, in random order: a disk that has been in use."""
    from .trace import WRITE, Trace

    clusters = geometry.clusters
    count = int(round(share * clusters))
    if count > 50_000_000:
        raise QsimError(f"fill={share:g} would write {count} clusters; use a larger cluster size or a smaller share")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(clusters, size=count, replace=False).astype(np.int64)
    offsets = chosen * geometry.cluster_size
    lengths = np.minimum(geometry.cluster_size, geometry.virtual_size - offsets)
    return Trace(np.full(count, WRITE, np.uint8), offsets, lengths.astype(np.uint32))


def image_from_qcow2(img) -> ImageState:
    """The state of a real image read by ``qsim.qcow2.open_image``: its tables, entries, host layout and refcounts."""
    from .events import F_COMPRESSED, F_COPIED, F_ZERO
    from .qcow2 import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO

    g = img.geometry
    cb = img.header.cluster_bits
    n_l1 = g.l1_entries
    keep = img.l2_tables < n_l1
    tables = img.l2_tables[keep]
    d = img.l2_descriptors[keep]
    compressed = (d & np.uint64(OFLAG_COMPRESSED)) != 0
    copied = (d & np.uint64(OFLAG_COPIED)) != 0
    x = 62 - (cb - 8)
    compressed_host = (d & np.uint64((1 << x) - 1)) >> np.uint64(cb)
    host = np.where(compressed, np.maximum(compressed_host, 1), (d & np.uint64(L2E_OFFSET_MASK)) >> np.uint64(cb))
    host = host.astype(np.int64)
    file_clusters = -(-img.file_bytes // g.cluster_size)
    beyond = (host >= file_clusters) & ~compressed
    if beyond.any():
        row, col = (int(v[0]) for v in np.nonzero(beyond))
        raise QsimError(f"{img.path}: L2 entry {col} of the table for L1 entry {tables[row]} points at host offset "
                        f"{int(host[row, col]) << cb:#x}, past the end of the file")
    flags = np.where(compressed, F_COMPRESSED, 0) | np.where(copied, F_COPIED, 0)
    if not g.extended_l2:
        flags |= np.where((d & np.uint64(OFLAG_ZERO)) != 0, F_ZERO, 0)
    table_slot = np.full(n_l1, SLOT_NONE, dtype=np.int32)
    table_slot[tables] = np.arange(len(tables), dtype=np.int32)
    l1_offsets = img.l1[tables] & np.uint64(L2E_OFFSET_MASK)
    bitmap = img.l2_bitmaps[keep].copy() if g.extended_l2 else np.zeros((1, 1), dtype=np.uint64)
    alloc = hostalloc.new_alloc_state(g.cluster_size, g.refcount_bits)
    alloc[hostalloc.REFTABLE_ENTRIES] = img.header.refcount_table_clusters * g.cluster_size // 8
    used = (img.refcounts > 0).astype(np.uint8)
    alloc[hostalloc.HIGH_WATER] = int(np.flatnonzero(used)[-1]) + 1 if used.any() else 0
    return ImageState(
        geometry=g,
        n_tables=len(tables),
        table_slot=table_slot,
        table_host=(l1_offsets >> np.uint64(cb)).astype(np.int64),
        entry_host=np.where(host == 0, 0, host).astype(np.int64),
        entry_flags=flags.astype(np.uint8),
        entry_bitmap=bitmap,
        host_used=used,
        refblock_covered=img.refblock_present.copy(),
        alloc_state=alloc,
        backing=bool(img.header.backing_file),
        description=f"image {os.path.basename(img.path)}",
    )


def backing_state(img) -> ImageState | None:
    """The state of a real image's backing file, when it is a readable qcow2 image (None when there is none).

    QsimError when the backing file is named but cannot be modelled (unreadable, or not qcow2)."""
    from .qcow2 import open_image

    name = img.header.backing_file
    if not name:
        return None
    path = name if os.path.isabs(name) else os.path.join(os.path.dirname(img.path), name)
    if img.header.backing_format not in (None, "qcow2"):
        raise QsimError(f"{img.path}: backing file {name} is {img.header.backing_format}, not qcow2: its cache is "
                        "not modelled (replay without --backing-chain)")
    if not os.access(path, os.R_OK):
        raise QsimError(f"{img.path}: backing file {path} is not readable")
    return image_from_qcow2(open_image(path))
