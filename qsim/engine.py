"""Drives the stage-1 kernel (``qsim.stage1``) over a whole trace: buffers, chunking, state copies.

``run_kernel`` takes an image state and a trace and returns the cache event stream, the byte counters and the
image state after the trace. The trace is processed in chunks so event buffers stay bounded and a progress bar can
follow long runs; the kernel carries allocation state across chunks, so the result does not depend on chunking.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from numba import njit
from numba.typed import List as typed_list

from . import hostalloc
from .codes import BACKING_READ, DISCARD, PREALLOC, READ, STATUS
from .stage1 import structs as ev
from .stage1.driver import run_requests
from .errors import QsimError
from .imagestate import ImageState
from .stage1.entries import SP_OVERFLOW
from .trace import WRITE, Trace

CHUNK_EVENTS = 3 << 20  # events a chunk holds (shared by the buffer sets of a pipelined run): 51 MiB


@dataclass(frozen=True, eq=False)
class EventStream:
    """Stage-1 output for one (trace, image, geometry, entry size): L2 cache events in order.

    ``key`` int64 dense slice ids (0 .. n_keys-1), ``kind`` uint8 (events.GET, GET_DIRTY, GET_EMPTY), ``flush_at``
    int64: a whole-cache flush happens before event ``flush_at[j]`` (after all events before it).
    """

    key: np.ndarray
    kind: np.ndarray
    flush_at: np.ndarray
    n_keys: int
    entry_size: int
    counters: dict[str, int]


@dataclass(frozen=True, eq=False)
class KernelResult:
    image: ImageState
    events: EventStream


def geometry_vector(state: ImageState, entry_size: int, writethrough: bool,
                    below: tuple[tuple[ImageState, int], ...] = (), fast_paths: bool = True, discard: str = "ignore",
                    discard_no_unref: bool = False) -> np.ndarray:
    """The kernel's geometry and options vector (events.G_*). ``below``: the qcow2 layers of the backing chain
    whose own caches are modelled, nearest first, each with its cache's slice (entry) size; ``fast_paths``: the
    kernel's shortcuts for one-lookup reads and overwrites (the tests compare both ways; results are the same);
    ``discard``: QEMU's discard option (ignore or unmap) and ``discard_no_unref`` its qcow2 option."""
    g = state.geometry
    if entry_size % g.l2_entry_bytes or entry_size > g.cluster_size:
        raise QsimError(f"l2-cache-entry-size={entry_size} does not fit cluster_size={g.cluster_size}")
    slice_entries = entry_size // g.l2_entry_bytes
    vec = np.zeros(ev.GEOMETRY_SIZE, dtype=np.int64)
    vec[ev.G_CLUSTER_BITS] = g.cluster_size.bit_length() - 1
    vec[ev.G_TABLE_BITS] = g.l2_entries_per_table.bit_length() - 1
    vec[ev.G_SLICE_BITS] = slice_entries.bit_length() - 1
    vec[ev.G_SC_BITS] = g.subcluster_size.bit_length() - 1
    vec[ev.G_EXTENDED] = int(g.extended_l2)
    vec[ev.G_SPC] = g.subclusters_per_cluster
    vec[ev.G_SLICES_PER_TABLE] = g.l2_entries_per_table // slice_entries
    vec[ev.G_L1_SIZE] = g.l1_entries
    vec[ev.G_HAS_BACKING_FILE] = int(state.has_backing_file)
    vec[ev.G_WRITETHROUGH] = int(writethrough)
    # the layer right below is a modelled qcow2 image only while this one's backing file is that image; otherwise
    # a backing file has data everywhere up to its size (a raw file; a synthetic backing file as large as the image)
    modelled = bool(below) and state.has_backing_file
    vec[ev.G_BACKING_MODELLED] = int(modelled)
    if modelled:
        vec[ev.G_BACKING_SIZE] = below[0][0].geometry.virtual_size
    elif state.has_backing_file:
        vec[ev.G_BACKING_SIZE] = state.backing_size or g.virtual_size
    vec[ev.G_FAST_PATHS] = int(fast_paths)
    vec[ev.G_VIRTUAL_SIZE] = g.virtual_size // 512 * 512  # bs->total_sectors * BDRV_SECTOR_SIZE
    vec[ev.G_DISCARD_UNMAP] = int(discard == "unmap")
    vec[ev.G_DISCARD_NO_UNREF] = int(discard_no_unref)
    vec[ev.G_DATA_FILE] = int(state.has_data_file)
    return vec


def _l2_arrays(state: ImageState, g: np.ndarray) -> dict:
    """The arrays of the kernel's L2View of ``state``, by field name."""
    sp = state.sparse
    return dict(g=g, tslot=state.table_slot, thost=state.table_host, ehost=state.entry_host,
                eflags=state.entry_flags, ebits=state.entry_bitmap, skey=sp.key, shost=sp.host, sflags=sp.flags,
                sbits=sp.bitmap, sstate=sp.state)


class EventChunk(NamedTuple):
    """A piece of stage 1's output: L2 cache events (flush positions local to the chunk) and what was asked of the
    backing image (offsets, lengths, events.BACKING_READ / BACKING_STATUS), when one is modelled."""

    key: np.ndarray
    kind: np.ndarray
    flush_at: np.ndarray
    backing_offset: np.ndarray
    backing_length: np.ndarray
    backing_kind: np.ndarray
    refcount_log: np.ndarray = np.zeros((0, hostalloc.RLOG_WIDTH), np.int64)  # rows: see qsim.hostalloc

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self)

    def backing_trace(self) -> Trace:
        op = np.where(self.backing_kind == BACKING_READ, READ, STATUS).astype(np.uint8)
        return Trace(op, self.backing_offset, self.backing_length.astype(np.uint32), None, "<backing requests>")


def _room_needed(state: ImageState, trace: Trace, unmap: bool = False) -> tuple[int, int]:
    """(new L2 tables, new host clusters) the trace's writes (and, with ``unmap``, discards: they allocate the L2
    tables they reach) could need at most."""
    g = state.geometry
    writes = (trace.op == WRITE) | (trace.op == PREALLOC)
    allocating = writes | (trace.op == DISCARD) if unmap else writes
    if not allocating.any():
        return 0, 0
    cb = g.cluster_size.bit_length() - 1
    tb = g.l2_entries_per_table.bit_length() - 1
    spanned = int(min(((((trace.end[writes] - 1) >> cb) - (trace.offset[writes] >> cb)) + 1).sum(), g.clusters))
    first = trace.offset[allocating] >> cb
    last = (trace.end[allocating] - 1) >> cb
    touched = np.zeros(g.l1_entries + 1, dtype=bool)  # L1 indices the writes reach (one past the end: clipped)
    touched[np.minimum(first >> tb, g.l1_entries)] = True
    touched[np.minimum(last >> tb, g.l1_entries)] = True
    for i in np.flatnonzero((last >> tb) - (first >> tb) > 1):  # a write spanning whole tables
        touched[first[i] >> tb: min(last[i] >> tb, g.l1_entries) + 1] = True
    new_tables = int((touched[:-1] & (state.table_slot < 0)).sum())
    refcounts_per_block = g.cluster_size * 8 // g.refcount_bits
    host = spanned + new_tables
    return new_tables, host + 2 * (host // refcounts_per_block + 1)


def _entries_needed(state: ImageState, trace: Trace, new_tables: int, unmap: bool = False) -> int:
    """How many L2 entries of tables without dense rows the trace could write at most: every cluster a write
    spans (and, with ``unmap``, a discard), no more than those tables hold."""
    g = state.geometry
    cb = g.cluster_size.bit_length() - 1
    allocating = (trace.op == WRITE) | (trace.op == PREALLOC)
    if unmap:
        allocating |= trace.op == DISCARD
    first = trace.offset[allocating] >> cb
    spanned = int((((trace.end[allocating] - 1) >> cb) - first + 1).sum()) if len(first) else 0
    sparse_tables = max(state.n_tables + new_tables - state.dense_tables, 0)
    return min(spanned, sparse_tables * g.l2_entries_per_table)


def _dense_is_cheaper(state: ImageState, new_tables: int, entries: int) -> bool:
    """Whether dense rows for ``new_tables`` new tables take no more memory than the sparse hash would for
    ``entries`` entries at its load of one half (building a preallocated image; a trace writing most of what it
    touches). Only while every table so far is dense: dense slots come first."""
    if state.n_tables > state.dense_tables or new_tables == 0:
        return False
    extended = state.geometry.extended_l2
    dense_bytes = new_tables * state.geometry.l2_entries_per_table * (17 if extended else 9)
    sparse_bytes = 2 * (state.sparse.count + entries) * (25 if extended else 17)
    return dense_bytes <= sparse_bytes


def events_nest(trace: Trace, state: ImageState, entry_size: int, unmap: bool = False) -> bool:
    """Whether every larger slice (entry) size sees exactly the L2 events ``entry_size`` sees, each key shifted
    right by log2 of the ratio (keys number slices in table order, and slices of a power-of-two size nest).

    True for a trace of reads, flushes and discards in which no read crosses an ``entry_size`` slice boundary: a
    read's lookups are one per extent, and extents are then cut by the image's mapping alone, never by a slice
    end; nothing allocates, so no table's slices are created. (Callers also require no modelled backing image.)
    With ``unmap`` (discard=unmap), discards change the image, and the trace must have none."""
    if has_ops(trace.op, (WRITE, PREALLOC, STATUS, DISCARD) if unmap else (WRITE, PREALLOC, STATUS)):
        return False
    g = state.geometry
    slice_bits = (entry_size // g.l2_entry_bytes * g.cluster_size).bit_length() - 1
    return _reads_within_slices(trace.op, trace.offset, trace.length, slice_bits)


@njit(cache=True)
def has_ops(op, codes):
    """Whether any request's op is one of ``codes`` (a tuple; one pass without temporaries, stopping at the first)."""
    for i in range(op.shape[0]):
        o = op[i]
        for code in codes:
            if o == code:
                return True
    return False


@njit(cache=True)
def _reads_within_slices(op, offset, length, slice_bits):
    for i in range(op.shape[0]):
        if op[i] == READ and length[i] > 0 and \
                (offset[i] >> slice_bits) != ((offset[i] + np.int64(length[i]) - 1) >> slice_bits):
            return False
    return True


_EMPTY_VIEW_ARRAYS = dict(g=np.zeros(ev.GEOMETRY_SIZE, np.int64), tslot=np.zeros(0, np.int32),
                          thost=np.zeros(0, np.int64), ehost=np.zeros((1, 1), np.int64),
                          eflags=np.zeros((1, 1), np.uint8), ebits=np.zeros((1, 1), np.uint64),
                          skey=np.full(2, -1, np.int64), shost=np.zeros(2, np.int64), sflags=np.zeros(2, np.uint8),
                          sbits=np.zeros(1, np.uint64), sstate=np.array([0, 1, 0], np.int64))


def _view_list(views: list):
    """The layers below as the kernel takes them: a typed list of L2Views (a plain list without the JIT)."""
    from numba import config, typed

    if config.DISABLE_JIT:
        return list(views)
    if not views:  # (built in compiled, cached code: typed.List.empty_list compiles its helpers in every process)
        return _empty_view_list(ev.new_l2_view(**_EMPTY_VIEW_ARRAYS))
    return typed.List(views)


@njit(cache=True)
def _empty_view_list(template):
    """An empty typed list of ``template``'s type (L2View)."""
    views = typed_list()
    views.append(template)
    views.pop()
    return views


class KernelRun:
    """Stage 1 over a trace fed in chunks: the image state and allocator carry across chunks, so chunking never
    changes the result. The given image is never modified: the first chunk with writes works on a copy, grown as
    later chunks need room."""

    def __init__(self, state: ImageState, entry_size: int, writethrough: bool = False, record: bool = True,
                 below: tuple[tuple[ImageState, int], ...] = (), fast_paths: bool = True, discard: str = "ignore",
                 discard_no_unref: bool = False):
        self.original = state
        self.work: ImageState | None = None
        self.below = below
        self.unmap = discard == "unmap"
        self.g = geometry_vector(state, entry_size, writethrough, below, fast_paths, discard, discard_no_unref)
        # The kernel's structs hold borrowed views (no reference counts), so every array they see is kept here.
        # Each layer below answers zero-checks with its own slice size (extents end at its slice ends).
        self.below_arrays = [_l2_arrays(layer, geometry_vector(layer, size, False, below[k + 1:]))
                             for k, (layer, size) in enumerate(below)]
        self.below_views = _view_list([ev.new_l2_view(**arrays) for arrays in self.below_arrays])
        self.entry_size = entry_size
        self.record = record
        self.st = np.zeros(ev.STATE_SIZE, dtype=np.int64)
        self.st[ev.S_SLOTS] = state.n_tables
        self.cnt = np.zeros(ev.COUNTERS_SIZE, dtype=np.int64)
        self.rst = np.zeros(hostalloc.RST_SIZE, dtype=np.int64)
        self.capacity = CHUNK_EVENTS if record else 0
        self.buffers = None  # sets of (events, backing queue, refcount log) arrays, kept across chunks
        self.turn = 0  # the buffer set of the next chunk, counted over every chunk made

    @property
    def n_keys(self) -> int:
        """One past the largest event key so far: keys are table slot x slices per table + slice, and slots number
        the tables present or created. Stage 2 starts at this size and grows with it, so its memory follows the
        tables the image has and the trace creates, not every table the L1 table could address."""
        return int(self.g[ev.G_SLICES_PER_TABLE]) * max(int(self.st[ev.S_SLOTS]), 1)

    @property
    def image(self) -> ImageState:
        current = self.work if self.work is not None else self.original
        return replace(current, n_tables=int(self.st[ev.S_SLOTS]))

    def _make_room(self, trace: Trace) -> ImageState:
        if not has_ops(trace.op, (WRITE, PREALLOC, DISCARD) if self.unmap else (WRITE, PREALLOC)):
            return self.work if self.work is not None else self.original  # reads never change the image
        current = self.image
        extra_tables, extra_host = _room_needed(current, trace, self.unmap)
        extra_entries = _entries_needed(current, trace, extra_tables, self.unmap)
        sparse = None if _dense_is_cheaper(current, extra_tables, extra_entries) else extra_entries
        if self.work is None:
            self.work = current.with_capacity(extra_tables, extra_host, sparse)
        else:
            rows_free = len(self.work.table_host) - current.n_tables
            host_free = len(self.work.host_used) - int(self.work.alloc_state[hostalloc.HIGH_WATER])
            hash_free = len(self.work.sparse.key) // 2 - self.work.sparse.count
            if rows_free < extra_tables or host_free < extra_host + 1024 or hash_free < extra_entries:
                grow_tables = max(extra_tables, current.n_tables)
                grow_host = max(extra_host, int(self.work.alloc_state[hostalloc.HIGH_WATER]) // 2)
                sparse = None if _dense_is_cheaper(current, grow_tables, extra_entries) else extra_entries
                self.work = current.with_capacity(grow_tables, grow_host, sparse, share_entries=sparse is not None)
        return self.work

    def feed(self, trace: Trace, progress=None, buffer_sets: int = 1):
        """Run the kernel over ``trace``; yields EventChunks, flush positions local to each. A chunk's arrays are
        the run's buffers, overwritten ``buffer_sets`` chunks later (each set holds 1/buffer_sets of the events of
        one): copy what you keep, or be done with each chunk before the one ``buffer_sets`` later is made (as the
        replay's pipeline is: qsim.replay, prefetch's in_flight)."""
        work = self._make_room(trace)
        i, n = 0, len(trace)
        offset = trace.offset
        length = trace.length  # uint32: the kernel widens each value, no int64 copy of the whole column
        while i < n:
            capacity = self.capacity // buffer_sets if self.record else 0
            # the refcount log: room for a linear search through every refcount block in one request
            log_rows = capacity // 8 + 4 * len(work.refblock_covered) + 4096 if self.record else 0
            if self.buffers is None or len(self.buffers) != buffer_sets:
                self.buffers = [None] * buffer_sets
            turn = self.turn % buffer_sets  # (carried across calls: the sets go round over every chunk of a trace)
            buffers = self.buffers[turn]
            if buffers is None or len(buffers[0][0]) != capacity or len(buffers[2]) < log_rows:
                # (reused: no fresh pages per chunk)
                queue_size = capacity if self.g[ev.G_BACKING_MODELLED] else 0
                buffers = self.buffers[turn] = (
                    (np.empty(capacity, np.int64), np.empty(capacity, np.uint8), np.empty(capacity, np.int64)),
                    (np.empty(queue_size, np.int64), np.empty(queue_size, np.int64), np.empty(queue_size, np.uint8)),
                    np.empty((log_rows, hostalloc.RLOG_WIDTH), np.int64))
            out, queue, rlog = buffers
            self.st[ev.S_EVENTS] = 0
            self.st[ev.S_FLUSHES] = 0
            self.st[ev.S_BACKING] = 0
            self.rst[:] = 0
            run = ev.new_run(**_l2_arrays(work, self.g), below=self.below_views, used=work.host_used,
                             covered=work.refblock_covered, alloc=work.alloc_state, okey=out[0], okind=out[1],
                             oflush=out[2], state=self.st, bqoff=queue[0], bqlen=queue[1], bqkind=queue[2],
                             cnt=self.cnt, rlog=rlog, rst=self.rst)  # borrows: all stay alive until the run ends
            nxt = run_requests(run, trace.op, offset, length, i, n)
            if nxt == i:  # one request needs more room than a whole buffer: grow it
                self.capacity *= 4
                continue
            if work.alloc_state[hostalloc.OVERFLOW]:
                raise QsimError("internal error: the host cluster map was sized too small (please report this trace)")
            if work.sparse.state[SP_OVERFLOW]:
                raise QsimError("internal error: the sparse L2 entry table was sized too small (please report this "
                                "trace)")
            if progress is not None:
                progress(nxt - i)
            i = nxt
            if self.record:
                events, flushes, asked = self.st[ev.S_EVENTS], self.st[ev.S_FLUSHES], self.st[ev.S_BACKING]
                self.turn += 1
                yield EventChunk(out[0][:events], out[1][:events], out[2][:flushes], queue[0][:asked],
                                 queue[1][:asked], queue[2][:asked], rlog[: self.rst[hostalloc.RS_COUNT]])

    @property
    def counters(self) -> dict[str, int]:
        counters = {name: int(self.cnt[k]) for k, name in enumerate(ev.COUNTER_NAMES)}
        alloc = self.image.alloc_state
        counters["refcount_blocks_allocated"] = int(alloc[hostalloc.REFBLOCKS_MADE] -
                                                    self.original.alloc_state[hostalloc.REFBLOCKS_MADE])
        counters["refcount_table_moves"] = int(alloc[hostalloc.REFTABLE_GROWN] -
                                               self.original.alloc_state[hostalloc.REFTABLE_GROWN])
        return counters


def run_kernel(state: ImageState, trace: Trace, entry_size: int, writethrough: bool = False, record: bool = True,
               reopen: bool = False, progress=None, fast_paths: bool = True) -> KernelResult:
    """Replay ``trace`` on a copy of ``state`` (the original is never changed) and keep every event. ``record``
    keeps the events; ``reopen`` leaves the result as a freshly opened image (free cluster index 0), as QEMU's next
    open sees it."""
    run = KernelRun(state, entry_size, writethrough, record, fast_paths=fast_paths)
    keys, kinds, flushes = [], [], []
    before = 0
    for key, kind, flush_at, *_ in run.feed(trace, progress):
        keys.append(key.copy())
        kinds.append(kind.copy())
        flushes.append(flush_at + before)
        before += len(key)
    image = run.image
    if reopen and run.work is not None:
        image.alloc_state[hostalloc.FREE_INDEX] = 0
        image.alloc_state[hostalloc.USED_DELTA] = 0
    stream = EventStream(
        key=np.concatenate(keys) if keys else np.zeros(0, np.int64),
        kind=np.concatenate(kinds) if kinds else np.zeros(0, np.uint8),
        flush_at=np.concatenate(flushes) if flushes else np.zeros(0, np.int64),
        n_keys=run.n_keys,
        entry_size=entry_size,
        counters=run.counters,
    )
    return KernelResult(image, stream)
