"""The shared vocabulary of qsim's data: request ops, L2 cache event kinds, L2 entry flags, subcluster types.

Plain integers, so that numpy arrays and the numba kernels carry them, defined once here for every module: trace
readers write the op codes, stage 1 (``qsim.stage1``) reads them and writes event kinds, stage 2 (``qsim.lru``)
reads event kinds. Nothing here imports anything, so every module may import this one.
"""

from __future__ import annotations

# Request ops (Trace.op, uint8). The first four come from traces; the last two only from qsim itself.
READ, WRITE, DISCARD, FLUSH = 0, 1, 2, 3
OP_NAMES = ("read", "write", "discard", "flush")
PREALLOC = 4  # qemu-img create -o preallocation=metadata's allocation of a range (allocates, writes no data)
STATUS = 5  # a block-status query (what a backing image is asked for a COW region's zero check)

# L2 cache event kinds (stage 1 -> stage 2, uint8)
GET = 0  # a lookup of a slice
GET_DIRTY = 1  # a lookup whose slice is then dirtied
GET_EMPTY = 2  # a new table's slice taken without a read (qcow2_cache_get_empty): dirty, never a disk read

# Refcount-block cache operations (stage 1's refcount log -> the coupled stage 2, qsim.refcache), int64
R_GET = 0  # a lookup of a refcount block (qcow2_get_refcount, load_refcount_block)
R_GET_DIRTY = 1  # a lookup whose block is then dirtied (update_refcount)
R_GET_EMPTY = 2  # a new refcount block taken without a read (qcow2_cache_get_empty), dirtied
R_FLUSH = 3  # qcow2_cache_flush of the refcount cache
R_L2_FLUSH = 4  # a whole L2-cache flush stage 1 put in its L2 stream (one per flush, in order)
R_L2_DEP_FLUSH = 5  # the same, made for the refcount cache's dependency on the L2 cache (QEMU flushes only if set)
R_L2_DEPENDS = 6  # qcow2_cache_set_dependency(L2 cache, refcount cache): an L2 link
R_RC_DEPENDS = 7  # qcow2_cache_set_dependency(refcount cache, L2 cache): a refcount decrease

# What an image asks of its backing image, when that image's cache is modelled
BACKING_READ, BACKING_STATUS = 0, 1

# L2 entry flags (ImageState.entry_flags, uint8): QCOW_OFLAG_ZERO / _COMPRESSED / _COPIED as bits
F_ZERO, F_COMPRESSED, F_COPIED = 1, 2, 4

# Subcluster types (QEMU's QCow2SubclusterType)
NORMAL, ZERO_PLAIN, ZERO_ALLOC, UNALLOC_PLAIN, UNALLOC_ALLOC, COMPRESSED = range(6)

# Trace file formats qsim reads (``--format``; detected from the content when not given)
TRACE_FORMATS = ("iolog", "blkparse", "csv", "npz", "qemu-log", "vscsi", "blktrace", "msr", "alibaba", "tencent")

# The most requests ``qsim trace synth`` makes (in memory, about 40 bytes each while generating: 4 GB here)
MAX_SYNTH_REQUESTS = 100_000_000

# qsim plan: what a host's split minimises, and the cache sizes it sweeps when it runs the sweep itself
PLAN_OBJECTIVES = {
    "misses": "L2 misses",
    "metadata-bytes": "metadata bytes read and written",
    "misses-per-second": "L2 misses per second of trace time",
}
DEFAULT_PLAN_CACHE_SIZES = "64k..64M:40,default"

# Choices that are part of a replay scenario
CACHE_MODES = ("writeback", "writethrough")  # a VM's default; qemu-io's (a flush after every write)
OFFSET_POLICIES = ("error", "skip", "wrap")  # what a request ending beyond the disk gets
