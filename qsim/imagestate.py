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
from .stage1.entries import EMPTY_KEY, SP_BITS, SP_COUNT, SPARSE_STATE_SIZE, rehash

SLOT_NONE = -1


@dataclass(frozen=True, eq=False)
class SparseEntries:
    """The L2 entries of tables created during a replay, only those ever written: an open-addressing hash
    (qsim.stage1.entries) keyed by ``slot << table_bits | index``. ``key`` int64 [2^k] (-1: empty), ``host`` int64,
    ``flags`` uint8, ``bitmap`` uint64 (extended_l2; else [1]), ``state`` int64 (entries.SP_*: count, log2 of the
    capacity, overflow)."""

    key: np.ndarray
    host: np.ndarray
    flags: np.ndarray
    bitmap: np.ndarray
    state: np.ndarray

    @property
    def count(self) -> int:
        return int(self.state[SP_COUNT])

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.host.nbytes + self.flags.nbytes + self.bitmap.nbytes

    @staticmethod
    def empty(extended_l2: bool, capacity: int = 2) -> SparseEntries:
        """An empty hash of ``capacity`` (a power of two, at least 2) positions."""
        state = np.zeros(SPARSE_STATE_SIZE, dtype=np.int64)
        state[SP_BITS] = capacity.bit_length() - 1
        return SparseEntries(np.full(capacity, EMPTY_KEY, dtype=np.int64), np.zeros(capacity, dtype=np.int64),
                             np.zeros(capacity, dtype=np.uint8),
                             np.zeros(capacity if extended_l2 else 1, dtype=np.uint64), state)

    def with_room(self, extra: int, extended_l2: bool, share: bool = False) -> SparseEntries:
        """A copy (``share``: this one, when it has the room) with room for ``extra`` more keys at a load of at most
        one half, rehashed into a larger table when needed, at least doubling (amortized O(1) per key)."""
        want = 2 * (self.count + extra)
        capacity = len(self.key)
        if want <= capacity:
            if share:
                return self
            return SparseEntries(self.key.copy(), self.host.copy(), self.flags.copy(), self.bitmap.copy(),
                                 self.state.copy())
        capacity = max(1 << (want - 1).bit_length(), 2 * capacity)
        out = SparseEntries.empty(extended_l2, capacity)
        out.state[SP_COUNT] = rehash(self.key, self.host, self.flags, self.bitmap, out.key, out.host, out.flags,
                                     out.bitmap, int(out.state[SP_BITS]))
        return out

    def items(self, table_bits: int):
        """(slot, index, host, flags, bitmap or None) arrays of the stored entries."""
        used = self.key != EMPTY_KEY
        key = self.key[used]
        return (key >> table_bits, key & ((1 << table_bits) - 1), self.host[used], self.flags[used],
                self.bitmap[used] if len(self.bitmap) == len(self.key) else None)


@dataclass(frozen=True, eq=False)
class ImageState:
    """Allocation state of one image. Arrays (tables are numbered by slot, in the order they appear):

    - ``table_slot`` int32 [L1 entries]: slot of the L2 table of each L1 entry, -1 when there is none
    - ``table_host`` int64 [slots]: host cluster index of each L2 table
    - the L2 entries of the first ``dense_tables`` slots (the tables the image held when loaded or built), dense:
      ``entry_host`` int64 [dense slots, entries per table]: host cluster index of each guest cluster, 0 = none;
      ``entry_flags`` uint8 [dense slots, entries]: codes.F_ZERO / F_COMPRESSED / F_COPIED;
      ``entry_bitmap`` uint64 [dense slots, entries]: extended_l2 subcluster bitmap, QEMU's layout (bits 0-31
      allocated, 32-63 reads as zero); a [1, 1] placeholder without extended_l2
    - ``sparse``: the entries of the later slots (tables created by a replay), only those written (SparseEntries):
      memory follows the clusters a trace writes, not the 72 KiB of a whole table per table it touches
    - ``host_used`` uint8 [host clusters]: refcount > 0; ``refblock_covered`` uint8 [refcount blocks]
    - ``alloc_state`` int64: hostalloc state (free index, refcount block size, ...)

    Read entries with ``table_entries`` (or the kernels' qsim.stage1.entries), never by indexing ``entry_host``.
    ``has_backing_file``: a backing file sits below, so copy-on-write copies its data instead of zero-filling;
    ``backing_size``: its size in bytes (0: as large as this image), beyond which QEMU reads zeroes.
    ``has_data_file``: guest data lives in an external data file at the guest offset (``-o data_file``): data
    clusters' host indexes are stage1.entries.data_file_host values, and only L2 tables (and refcount structures)
    are allocated in the image file.
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
    sparse: SparseEntries | None = None
    has_data_file: bool = False

    def __post_init__(self):
        if self.sparse is None:
            object.__setattr__(self, "sparse", SparseEntries.empty(self.geometry.extended_l2))

    @property
    def dense_tables(self) -> int:
        """Slots below this have dense entry rows."""
        return self.entry_host.shape[0]

    @property
    def table_bits(self) -> int:
        return self.geometry.l2_entries_per_table.bit_length() - 1

    @property
    def clusters_allocated(self) -> int:
        _, _, host, _, _ = self.sparse.items(self.table_bits)
        return int(np.count_nonzero(self.entry_host[: self.n_tables])) + int(np.count_nonzero(host))

    @property
    def file_bytes(self) -> int:
        """Image file size: one past the last used host cluster."""
        return int(self.alloc_state[hostalloc.HIGH_WATER]) * self.geometry.cluster_size

    def table_entries(self, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(host clusters int64, flags uint8, bitmaps uint64 or None without extended_l2) of one table's entries."""
        extended = self.geometry.extended_l2
        if slot < self.dense_tables:
            return (self.entry_host[slot].copy(), self.entry_flags[slot].copy(),
                    self.entry_bitmap[slot].copy() if extended else None)
        return tuple(a[0] if a is not None else None for a in self._sparse_rows(np.array([slot])))

    def entry_matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Every table's entries as dense [n_tables, entries] arrays (host, flags, bitmap or None): for tests and
        small images."""
        dense = min(self.dense_tables, self.n_tables)
        rows = self._sparse_rows(np.arange(dense, self.n_tables))
        ext = self.geometry.extended_l2
        return (np.concatenate([self.entry_host[:dense], rows[0]]),
                np.concatenate([self.entry_flags[:dense], rows[1]]),
                np.concatenate([self.entry_bitmap[:dense], rows[2]]) if ext else None)

    def _sparse_rows(self, slots: np.ndarray):
        entries = self.geometry.l2_entries_per_table
        host = np.zeros((len(slots), entries), dtype=np.int64)
        flags = np.zeros((len(slots), entries), dtype=np.uint8)
        bitmap = np.zeros((len(slots), entries), dtype=np.uint64) if self.geometry.extended_l2 else None
        slot, idx, h, f, b = self.sparse.items(self.table_bits)
        row = np.searchsorted(slots, slot)
        keep = (row < len(slots)) & (slots[np.minimum(row, len(slots) - 1)] == slot) if len(slots) else \
            np.zeros(len(slot), dtype=bool)
        host[row[keep], idx[keep]] = h[keep]
        flags[row[keep], idx[keep]] = f[keep]
        if bitmap is not None:
            bitmap[row[keep], idx[keep]] = b[keep]
        return host, flags, bitmap

    def with_capacity(self, extra_tables: int, extra_host_clusters: int, sparse_entries: int | None = None,
                      share_entries: bool = False) -> ImageState:
        """A copy with room for more tables and host clusters, ready to be changed by a replay.

        ``sparse_entries`` None: new tables get dense rows (what building a preallocated or filled image wants:
        it writes most of each table), which is possible only while every table so far is dense. Otherwise the new
        tables keep their entries in the sparse hash, with room for that many more. ``share_entries``: the dense
        rows are this replay's own working copy already and are shared, not copied (growth during one replay)."""
        extended = self.geometry.extended_l2
        entries = self.geometry.l2_entries_per_table
        dense_new = sparse_entries is None
        if dense_new and self.n_tables > self.dense_tables:
            raise ValueError("dense rows for new tables need every earlier table to be dense")
        rows = self.n_tables + extra_tables if dense_new else self.dense_tables
        ext_shape = (rows, entries) if extended else (1, 1)

        def grow(a: np.ndarray, shape, dtype):
            if a.shape == shape and share_entries:
                return a
            out = np.zeros(shape, dtype=dtype)
            if a.ndim == 2 and a.shape[1] == shape[1] and shape[1] > 1:  # not the [1, 1] placeholder
                n = min(a.shape[0], shape[0], self.n_tables)
                out[:n] = a[:n]
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
            table_host=grow(self.table_host, (self.n_tables + extra_tables,), np.int64),
            entry_host=grow(self.entry_host, (rows, entries), np.int64),
            entry_flags=grow(self.entry_flags, (rows, entries), np.uint8),
            entry_bitmap=grow(self.entry_bitmap, ext_shape, np.uint64),
            host_used=grow(self.host_used, (max(host_clusters, len(self.host_used)),), np.uint8),
            refblock_covered=grow(self.refblock_covered, ((host_clusters >> refblock_bits) + 2,), np.uint8),
            alloc_state=self.alloc_state.copy(),
            has_backing_file=self.has_backing_file,
            description=self.description,
            backing_size=self.backing_size,
            sparse=self.sparse.with_room(sparse_entries or 0, extended, share_entries),
            has_data_file=self.has_data_file,
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
        entry_bitmap=np.zeros((0, entries) if geometry.extended_l2 else (1, 1), dtype=np.uint64),
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
