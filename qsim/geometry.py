"""qcow2 image geometry and its metadata cost, byte-exact with ``qemu-img measure``.

Follows QEMU's block/qcow2.c (qcow2_calc_prealloc_size, qcow2_measure) and block/qcow2-refcount.c
(qcow2_refcount_metadata_size): a header cluster, L2 tables for every cluster, an L1 table in whole clusters, and
refcount blocks and table found by a fixed-point loop, since refcount metadata counts itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import QsimError
from .units import format_size, is_power_of_two

MIN_CLUSTER_SIZE = 512
MAX_CLUSTER_SIZE = 2 * 1024 * 1024
MIN_EXTENDED_L2_CLUSTER_SIZE = 16 * 1024
SUBCLUSTERS_PER_CLUSTER = 32
L1_ENTRY_BYTES = 8
REFTABLE_ENTRY_BYTES = 8
MAX_L1_BYTES = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    return _ceil_div(n, multiple) * multiple


@dataclass(frozen=True)
class ImageGeometry:
    """How a qcow2 image maps guest bytes: virtual size, cluster size (bytes), entry format, refcount width (bits)."""

    virtual_size: int
    cluster_size: int = 65536
    extended_l2: bool = False
    refcount_bits: int = 16

    def __post_init__(self) -> None:
        if not (is_power_of_two(self.cluster_size) and MIN_CLUSTER_SIZE <= self.cluster_size <= MAX_CLUSTER_SIZE):
            raise QsimError(
                f"cluster_size={self.cluster_size}: Cluster size must be a power of two between 512 and 2048k"
            )
        if not (is_power_of_two(self.refcount_bits) and self.refcount_bits <= 64):
            raise QsimError(
                f"refcount_bits={self.refcount_bits}: Refcount width must be a power of two and may not exceed 64 bits"
            )
        if self.extended_l2 and self.cluster_size < MIN_EXTENDED_L2_CLUSTER_SIZE:
            raise QsimError(
                f"extended_l2=on with cluster_size={format_size(self.cluster_size)}: Extended L2 entries are only "
                "supported with cluster sizes of at least 16384 bytes"
            )
        if self.virtual_size < 0:
            raise QsimError(f"virtual size {self.virtual_size} is negative")

    # --- sizes of one thing -------------------------------------------------------------------------------------
    @property
    def l2_entry_bytes(self) -> int:
        """8 bytes per L2 entry, 16 with extended_l2 (descriptor + subcluster bitmap)."""
        return 16 if self.extended_l2 else 8

    @property
    def subclusters_per_cluster(self) -> int:
        return SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.subclusters_per_cluster

    @property
    def l2_entries_per_table(self) -> int:
        """Entries in one L2 table (one cluster)."""
        return self.cluster_size // self.l2_entry_bytes

    @property
    def bytes_per_l2_table(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.l2_entries_per_table * self.cluster_size

    # --- whole-disk counts --------------------------------------------------------------------------------------
    @property
    def clusters(self) -> int:
        """Guest clusters of the disk (the last one may be partial)."""
        return _ceil_div(self.virtual_size, self.cluster_size)

    @property
    def l2_tables(self) -> int:
        """L2 tables a fully allocated disk has (one L1 entry each)."""
        return _ceil_div(self.clusters, self.l2_entries_per_table)

    @property
    def l1_entries(self) -> int:
        return self.l2_tables

    @property
    def full_l2_cache_bytes(self) -> int:
        """L2 cache that covers the whole disk: QEMU's max_l2_cache, rounded up to whole clusters."""
        return round_up(self.clusters * self.l2_entry_bytes, self.cluster_size)

    def check_l1_size(self) -> None:
        """QEMU refuses images whose L1 table would exceed 32 MiB."""
        if self.l2_tables * L1_ENTRY_BYTES > MAX_L1_BYTES:
            raise QsimError(
                f"virtual size {format_size(self.virtual_size)} with cluster_size={format_size(self.cluster_size)}: "
                "The image size is too large (try using a larger cluster size)"
            )


def refcount_metadata_clusters(clusters: int, cluster_size: int, refcount_bits: int) -> tuple[int, int]:
    """(refcount blocks, refcount table clusters) needed to count ``clusters`` host clusters plus themselves.

    The fixed-point loop of QEMU's qcow2_refcount_metadata_size (without generous_increase).
    """
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_BYTES
    refcounts_per_block = cluster_size * 8 // refcount_bits
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = _ceil_div(clusters + table + blocks, refcounts_per_block)
        table = _ceil_div(blocks, blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return blocks, table


@dataclass(frozen=True)
class MetadataSize:
    """Bytes of each kind of metadata of a fully allocated image, and the two numbers ``qemu-img measure`` prints."""

    header_bytes: int
    l1_bytes: int
    l2_bytes: int
    refcount_table_bytes: int
    refcount_block_bytes: int
    data_bytes: int
    required: int
    fully_allocated: int

    @property
    def metadata_bytes(self) -> int:
        return self.header_bytes + self.l1_bytes + self.l2_bytes + self.refcount_table_bytes + self.refcount_block_bytes


def measure(geometry: ImageGeometry) -> MetadataSize:
    """What ``qemu-img measure -O qcow2 --size N -o ...`` reports for a new image of this geometry."""
    geometry.check_l1_size()
    c = geometry.cluster_size
    e = geometry.l2_entry_bytes
    aligned = round_up(geometry.virtual_size, c)
    header = c
    l2_entries = round_up(aligned // c, c // e)
    l2 = l2_entries * e
    l1_entries = round_up(l2_entries * e // c, c // L1_ENTRY_BYTES)
    l1 = l1_entries * L1_ENTRY_BYTES
    meta = header + l2 + l1
    blocks, table = refcount_metadata_clusters((meta + aligned) // c, c, geometry.refcount_bits)
    fully = meta + (blocks + table) * c + aligned
    return MetadataSize(
        header_bytes=header,
        l1_bytes=l1,
        l2_bytes=l2,
        refcount_table_bytes=table * c,
        refcount_block_bytes=blocks * c,
        data_bytes=aligned,
        required=fully - aligned,
        fully_allocated=fully,
    )
