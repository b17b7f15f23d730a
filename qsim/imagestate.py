"""ImageState: what a qcow2 image has allocated -- L2 tables, clusters, subclusters and host layout.

One plain type for every image the model replays against: synthetic ones (fresh, metadata-preallocated, partly
filled; built in ``qsim.image``) and real ones read from disk (``qsim.image.image_from_qcow2``). Only the fresh
image is made here, since it needs no replay: ``qemu-img create``'s header, refcount table and block, and L1 table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import hostalloc
from .geometry import L1_ENTRY_BYTES, ImageGeometry

SLOT_NONE = -1


@dataclass(frozen=True, eq=False)
class ImageState:
    """Allocation state of one image. Arrays (one row per L2 table, in slot order; tables are numbered by slot):

    - ``table_slot`` int32 [L1 entries]: slot of the L2 table of each L1 entry, -1 when there is none
    - ``table_host`` int64 [slots]: host cluster index of each L2 table
    - ``entry_host`` int64 [slots, entries per table]: host cluster index of each guest cluster, 0 = none
    - ``entry_flags`` uint8 [slots, entries]: codes.F_ZERO / F_COMPRESSED / F_COPIED
    - ``entry_bitmap`` uint64 [slots, entries]: extended_l2 subcluster bitmap, QEMU's layout (bits 0-31 allocated,
      32-63 reads as zero); a [1, 1] placeholder without extended_l2
    - ``host_used`` uint8 [host clusters]: refcount > 0; ``refblock_covered`` uint8 [refcount blocks]
    - ``alloc_state`` int64: hostalloc state (free index, refcount block size, ...)

    ``has_backing_file``: a backing file sits below, so copy-on-write copies its data instead of zero-filling;
    ``backing_size``: its size in bytes (0: as large as this image), beyond which QEMU reads zeroes.
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
    has_backing_file: bool = False
    description: str = ""
    backing_size: int = 0

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

        refblock_bits = int(self.alloc_state[hostalloc.REFBLOCK_BITS])
        # a growing refcount table lands at the next refcount-block boundary past the end: room for two blocks' range
        host_clusters = int(self.alloc_state[hostalloc.HIGH_WATER]) + extra_host_clusters + 1024 + \
            (2 << refblock_bits)
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
            has_backing_file=self.has_backing_file,
            description=self.description,
            backing_size=self.backing_size,
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
    rlog, rst = hostalloc.no_log()
    hostalloc.alloc_clusters(used, covered, alloc, rlog, rst, 3)  # header, refcount table, refcount block
    if l1_clusters:
        hostalloc.alloc_clusters(used, covered, alloc, rlog, rst, l1_clusters)
    alloc[hostalloc.FREE_INDEX] = 0  # the image is opened afresh
    state = ImageState(
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
        has_backing_file=backing,
        description="preallocation=off",
    )
    return as_opened(state, 0)


# What qemu-img create leaves allocated on this machine's ext4 /tmp (st_blocks * 512): every metadata cluster
# written whole, the L1 table's bytes rounded up to a 4 KiB filesystem block, preallocated data clusters sparse.
FS_BLOCK_BYTES = 4096


def as_opened(state: ImageState, data_clusters_unwritten: int) -> ImageState:
    """The state as QEMU's next open sees it: the file's length and allocated bytes at open (what the preallocation
    scan reads) estimated for a synthetic image: metadata written whole, ``data_clusters_unwritten`` host clusters
    allocated but never written (metadata preallocation) left out, the L1 table in 4 KiB filesystem blocks."""
    g = state.geometry
    alloc = state.alloc_state
    l1_bytes = g.l1_entries * L1_ENTRY_BYTES
    l1_clusters = -(-l1_bytes // g.cluster_size)
    used = int(np.count_nonzero(state.host_used))
    written = (used - l1_clusters - data_clusters_unwritten) * g.cluster_size + \
        -(-l1_bytes // FS_BLOCK_BYTES) * FS_BLOCK_BYTES
    alloc[hostalloc.ALLOCATED_AT_OPEN] = written
    alloc[hostalloc.FILE_CLUSTERS_AT_OPEN] = alloc[hostalloc.HIGH_WATER]
    alloc[hostalloc.USED_DELTA] = 0
    alloc[hostalloc.FREE_INDEX] = 0
    return state
