"""Stage 1 of the replay: requests -> the exact stream of L2 cache events QEMU 7.2's qcow2 driver makes.

What QEMU does to its L2 cache for a request stream does not depend on the cache size: which slices are looked up,
created empty (``get_empty``) or dirtied, and where the caches are flushed, are fixed by the trace, the image state,
the geometry and the slice (entry) size. This module follows QEMU's code paths (block/qcow2.c qcow2_co_preadv_part,
qcow2_co_pwritev_part, handle_alloc_space; block/qcow2-cluster.c qcow2_get_host_offset, qcow2_alloc_host_offset,
handle_copied, handle_alloc, calculate_l2_meta, perform_cow, qcow2_alloc_cluster_link_l2, l2_allocate) request by
request. Allocation state makes this inherently sequential, so it is one numba kernel; its events go to stage 2
(``qsim.lru``), which turns them into hits, misses and write-backs for every cache size at once.

The kernel's arrays travel in two structs (numba structrefs) rather than as separate arguments, as views that
borrow the caller's memory: numba counts references (atomically) on every array argument of every call and every
field read, which cost about 2 us per write when 25 arrays went down five calls deep. ``Run`` holds the image's
L2 mapping in ``L2View``'s own fields (so it is passed wherever a view is) and everything a run changes: the
allocator's maps, the event and backing-request buffers, counters and scratch rows; the backing image is an
``L2View`` of its own. Reads and overwrites that are one lookup take a fast
path in ``run_requests``; the tests hold it to the general code.

Event keys are dense slice ids: ``table slot x slices per table + slice index`` (slots number L2 tables in the order
they appear), equivalent to QEMU's key (the slice's host offset) because tables never move or get freed here.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import carray, config, njit, types
from numba.experimental import structref
from numba.extending import intrinsic

from .bitops import leading_zeros32, trailing_zeros32
from .codes import (BACKING_READ, BACKING_STATUS, COMPRESSED, F_COMPRESSED, F_COPIED, F_ZERO, GET,
                    GET_DIRTY, GET_EMPTY, NORMAL, UNALLOC_ALLOC, UNALLOC_PLAIN, ZERO_ALLOC, ZERO_PLAIN)
from .codes import DISCARD as OP_DISCARD, FLUSH as OP_FLUSH, PREALLOC as OP_PREALLOC
from .codes import READ as OP_READ, STATUS as OP_STATUS, WRITE as OP_WRITE
from .hostalloc import REFBLOCKS_MADE, alloc_clusters, alloc_clusters_at, free_cluster


# geometry/options vector (int64) indices
(G_CLUSTER_BITS, G_TABLE_BITS, G_SLICE_BITS, G_SC_BITS, G_EXTENDED, G_SPC, G_SLICES_PER_TABLE, G_L1_SIZE,
 G_HAS_BACKING_FILE, G_WRITETHROUGH, G_BACKING_MODELLED, G_BACKING_SIZE, G_FAST_PATHS) = range(13)
GEOMETRY_SIZE = 13
# run state (int64) indices
S_EVENTS, S_FLUSHES, S_SLOTS, S_BACKING = range(4)
STATE_SIZE = 4
# counters (int64) indices
(C_REQUESTS, C_READS, C_WRITES, C_FLUSHES, C_DISCARDS, C_READ_BYTES, C_WRITE_BYTES, C_COW_READ_BYTES,
 C_COW_WRITE_BYTES, C_ZERO_FILL_BYTES, C_TABLES_ALLOCATED, C_CLUSTERS_ALLOCATED, C_ZERO_CHECKS,
 C_COW_READ_LOOKUPS) = range(14)
COUNTER_NAMES = ("requests", "reads", "writes", "flushes", "discards_ignored", "guest_read_bytes",
                 "guest_write_bytes", "cow_read_bytes", "cow_write_bytes", "zero_fill_bytes", "l2_tables_allocated",
                 "clusters_allocated", "zero_check_lookups", "cow_read_lookups")
COUNTERS_SIZE = len(COUNTER_NAMES)

# A meta (QCowL2Meta) row
M_ALLOC, M_GUEST_CLUSTER, M_NB, M_KEEP_OLD, M_START_OFF, M_START_N, M_END_OFF, M_END_N, M_SKIP = range(9)
META_WIDTH = 9
INT_MAX = 2**31 - 1
REQUEST_MAX_BYTES = 2**31 - 512
INV = -1


@structref.register
class L2ViewType(types.StructRef):
    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


class L2View(structref.StructRefProxy):
    """One image's L2 mapping: geometry vector ``g`` (G_* indices), L1 index -> table slot ``tslot`` (-1: none),
    slot -> host cluster of the table ``thost``, and per slot and entry the host cluster ``ehost`` (0: none),
    ``eflags`` (F_*) and the extended-L2 bitmap ``ebits``."""


L2_VIEW_FIELDS = ["g", "tslot", "thost", "ehost", "eflags", "ebits"]
structref.define_proxy(L2View, L2ViewType, L2_VIEW_FIELDS)


@structref.register
class RunType(types.StructRef):
    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


class Run(structref.StructRefProxy):
    """A kernel run: the image's L2 mapping in L2View's own fields (so a Run serves wherever an L2View does, without
    reading a nested struct), the backing image ``bim`` (L2View), the host allocator's maps (``used``,
    ``covered``, ``alloc``: see qsim.hostalloc), event buffers (``okey``, ``okind``, ``oflush``), the backing-request
    queue (``bqoff``, ``bqlen``, ``bqkind``), run state ``state`` (S_*), counters ``cnt`` (C_*) and scratch rows for
    QCowL2Meta (``metas``) and write parts (``part_first``, ``part_last``)."""


RUN_FIELDS = L2_VIEW_FIELDS + ["bim", "used", "covered", "alloc", "okey", "okind", "oflush", "state", "bqoff",
                               "bqlen", "bqkind", "cnt", "metas", "part_first", "part_last"]
structref.define_proxy(Run, RunType, RUN_FIELDS)


if config.DISABLE_JIT:  # plain Python (the tests' reference run of this same code): the fields on plain objects
    def new_l2_view(*arrays):
        return SimpleNamespace(**dict(zip(L2_VIEW_FIELDS, arrays)))

    def new_run(*arrays):
        return SimpleNamespace(**dict(zip(RUN_FIELDS, arrays + _scratch_rows())))
else:
    @intrinsic
    def _as_pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
        return types.voidptr(types.uintp), codegen

    @njit(cache=True, inline="always")
    def _borrowed(a):
        """The same memory as a view without a reference count: the caller keeps ``a`` alive."""
        return carray(_as_pointer(a.ctypes.data), a.shape, a.dtype)

    @njit(cache=True)
    def new_l2_view(g, tslot, thost, ehost, eflags, ebits):
        """An L2View (built in compiled code, so its constructor is cached with the rest)."""
        return L2View(_borrowed(g), _borrowed(tslot), _borrowed(thost), _borrowed(ehost), _borrowed(eflags),
                      _borrowed(ebits))

    @njit(cache=True)
    def new_run(g, tslot, thost, ehost, eflags, ebits, bim, used, covered, alloc, okey, okind, oflush, state, bqoff,
                bqlen, bqkind, cnt):
        """A Run over the image's arrays (L2View's fields) and the backing image's L2View ``bim``; run_requests
        sizes its scratch rows."""
        metas, part_first, part_last = _scratch_rows()
        return Run(_borrowed(g), _borrowed(tslot), _borrowed(thost), _borrowed(ehost), _borrowed(eflags),
                   _borrowed(ebits), bim, _borrowed(used), _borrowed(covered), _borrowed(alloc), _borrowed(okey),
                   _borrowed(okind), _borrowed(oflush), _borrowed(state), _borrowed(bqoff), _borrowed(bqlen),
                   _borrowed(bqkind), _borrowed(cnt), metas, part_first, part_last)


@njit(cache=True)
def _scratch_rows():
    return np.zeros((1, META_WIDTH), np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64)


@njit(cache=True, inline="always")
def _bitmaps(im, slot, idx):
    """(allocation bits, zero bits) of an extended L2 entry, as int64 (bits 0-31 and 32-63 of the bitmap)."""
    bitmap = im.ebits[slot, idx]
    return np.int64(bitmap & np.uint64(0xFFFFFFFF)), np.int64(bitmap >> np.uint64(32))


@njit(cache=True, inline="always")
def _subcluster_type(im, slot, idx, sc):
    f = im.eflags[slot, idx]
    h = im.ehost[slot, idx]
    if f & F_COMPRESSED:
        return COMPRESSED
    if im.g[G_EXTENDED]:
        abits, zbits = _bitmaps(im, slot, idx)
        if h != 0:
            if (zbits >> sc) & 1:
                return ZERO_ALLOC
            if (abits >> sc) & 1:
                return NORMAL
            return UNALLOC_ALLOC
        if (zbits >> sc) & 1:
            return ZERO_PLAIN
        return UNALLOC_PLAIN
    if f & F_ZERO:
        return ZERO_ALLOC if h != 0 else ZERO_PLAIN
    return NORMAL if h != 0 else UNALLOC_PLAIN


@njit(cache=True, inline="always")
def _range_type(im, slot, idx, sc_from):
    """(type of subcluster sc_from, how many subclusters from it share that type) -- qcow2_get_subcluster_range_type."""
    t = _subcluster_type(im, slot, idx, sc_from)
    spc = im.g[G_SPC]
    if not im.g[G_EXTENDED] or t == COMPRESSED:
        return t, spc - sc_from
    abits, zbits = _bitmaps(im, slot, idx)
    below = (np.int64(1) << sc_from) - 1
    if t == NORMAL:
        return t, trailing_zeros32(~(abits | below)) - sc_from
    if t == ZERO_PLAIN or t == ZERO_ALLOC:
        return t, trailing_zeros32(~(zbits | below)) - sc_from
    return t, trailing_zeros32((abits | zbits) & ~below) - sc_from


@njit(cache=True)
def _needs_new_alloc(im, slot, idx):
    """cluster_needs_new_alloc: only an allocated (normal or zero-allocated) cluster with COPIED is kept."""
    f = im.eflags[slot, idx]
    if f & F_COMPRESSED:
        return True
    if im.ehost[slot, idx] != 0 and (f & F_COPIED):
        return False
    return True


@njit(cache=True, inline="always")
def _emit(r, key, kind):
    if r.okey.shape[0] == 0:  # not recording (building a preallocated image)
        return
    st = r.state
    n = st[S_EVENTS]
    r.okey[n] = key
    r.okind[n] = kind
    st[S_EVENTS] = n + 1


@njit(cache=True)
def _flush(r):
    if r.oflush.shape[0] == 0:
        return
    st = r.state
    r.oflush[st[S_FLUSHES]] = st[S_EVENTS]
    st[S_FLUSHES] += 1


@njit(cache=True, inline="always")
def _slice_key(g, slot, idx):
    return slot * g[G_SLICES_PER_TABLE] + (idx >> g[G_SLICE_BITS])


@njit(cache=True)
def _alloc_flushing(r, at, n):
    """qcow2_alloc_clusters (at < 0: first host cluster) or qcow2_alloc_clusters_at (how many). Creating a refcount
    block on the way flushes the L2 cache first (alloc_refcount_block), once per block."""
    alloc = r.alloc
    before = alloc[REFBLOCKS_MADE]
    if at < 0:
        result = alloc_clusters(r.used, r.covered, alloc, n)
    else:
        result = alloc_clusters_at(r.used, r.covered, alloc, at, n)
    for _ in range(alloc[REFBLOCKS_MADE] - before):
        _flush(r)
    return result


@njit(cache=True)
def _l2_allocate(r, l1):
    """l2_allocate: a host cluster for the table, get_empty (dirty) for each slice, flush the whole L2 cache."""
    g = r.g
    host = _alloc_flushing(r, -1, 1)
    slot = r.state[S_SLOTS]
    r.state[S_SLOTS] = slot + 1
    r.tslot[l1] = slot
    r.thost[slot] = host
    for s in range(g[G_SLICES_PER_TABLE]):
        _emit(r, slot * g[G_SLICES_PER_TABLE] + s, GET_EMPTY)
    _flush(r)
    r.cnt[C_TABLES_ALLOCATED] += 1
    return slot


@njit(cache=True)
def _get_cluster_table(r, gc, kind):
    """get_cluster_table: the slice holding guest cluster gc, allocating the L2 table first if there is none."""
    g = r.g
    l1 = gc >> g[G_TABLE_BITS]
    slot = r.tslot[l1]
    if slot < 0:
        slot = _l2_allocate(r, l1)
    _emit(r, _slice_key(g, slot, gc & ((1 << g[G_TABLE_BITS]) - 1)), kind)
    return slot


@njit(cache=True, inline="always")
def _count_contiguous_subclusters(im, slot, idx, nb_clusters, sc_index):
    count = 0
    expected_type = NORMAL
    expected_host = 0
    check_offset = False
    for i in range(nb_clusters):
        first_sc = sc_index if i == 0 else 0
        t, ret = _range_type(im, slot, idx + i, first_sc)
        if i == 0:
            if t == COMPRESSED:
                return ret
            expected_type = t
            expected_host = im.ehost[slot, idx]
            check_offset = t == NORMAL or t == ZERO_ALLOC or t == UNALLOC_ALLOC
        elif t != expected_type:
            break
        elif check_offset:
            expected_host += 1
            if expected_host != im.ehost[slot, idx + i]:
                break
        count += ret
        if first_sc + ret < im.g[G_SPC]:
            break
    return count


@njit(cache=True)
def _host_extent(r, im, emit, pos, end):
    """qcow2_get_host_offset in image ``im`` (the run's image, or its backing image): one lookup (none without an
    L2 table; recorded when ``emit``) -> (bytes of this extent, its subcluster type, or -1 when no L2 table
    exists)."""
    g = im.g
    cb = g[G_CLUSTER_BITS]
    tb = g[G_TABLE_BITS]
    gc = pos >> cb
    oic = pos & ((1 << cb) - 1)
    idx = gc & ((1 << tb) - 1)
    in_slice = idx & ((1 << g[G_SLICE_BITS]) - 1)
    bytes_needed = min(end - pos + oic, ((1 << g[G_SLICE_BITS]) - in_slice) << cb)
    l1 = gc >> tb
    slot = im.tslot[l1] if l1 < g[G_L1_SIZE] else -1
    if slot < 0:
        return bytes_needed - oic, -1
    if emit:
        _emit(r, _slice_key(g, slot, idx), GET)
    nb = (bytes_needed + (1 << cb) - 1) >> cb
    sc_index = oic >> g[G_SC_BITS]
    count = _count_contiguous_subclusters(im, slot, idx, nb, sc_index)
    avail = (count + sc_index) << g[G_SC_BITS]
    t = _subcluster_type(im, slot, idx, sc_index)
    return min(avail, bytes_needed) - oic, t


@njit(cache=True)
def _read(r, pos, length):
    """The lookups of qcow2_co_preadv_part: one per extent; unallocated extents read the backing image (queued for
    its own cache model when one is given)."""
    modelled = r.g[G_BACKING_MODELLED]
    end = pos + length
    while pos < end:
        n, t = _host_extent(r, r, True, pos, end)
        if modelled and (t == -1 or t == UNALLOC_PLAIN or t == UNALLOC_ALLOC):
            _queue_backing(r, pos, n, BACKING_READ)
        pos += n


@njit(cache=True)
def _queue_backing(r, pos, n, kind):
    """Ask the backing image for [pos, pos+n), as far as it reaches (beyond its end reads as zeroes)."""
    backing_size = r.g[G_BACKING_SIZE]
    if pos >= backing_size:
        return
    st = r.state
    k = st[S_BACKING]
    r.bqoff[k] = pos
    r.bqlen[k] = min(n, backing_size - pos)
    r.bqkind[k] = kind
    st[S_BACKING] = k + 1


@njit(cache=True)
def _calculate_l2_meta(r, nmeta, host_cluster, guest, nbytes, slot, idx, keep_old):
    """calculate_l2_meta: append a QCowL2Meta with its COW regions, unless nothing needs doing (keep_old, all
    written subclusters already normal). Returns the new meta count."""
    g = r.g
    cb = g[G_CLUSTER_BITS]
    scb = g[G_SC_BITS]
    spc = g[G_SPC]
    cs = np.int64(1) << cb
    sc_size = np.int64(1) << scb
    cow_start_to = guest & (cs - 1)
    cow_end_from = cow_start_to + nbytes
    nb_clusters = (cow_end_from + cs - 1) >> cb
    skip_cow = keep_old
    if skip_cow:
        for i in range(nb_clusters):
            write_from = max(cow_start_to, i << cb)
            write_to = min(cow_end_from, (i + 1) << cb)
            first_sc = (write_from >> scb) & (spc - 1)
            last_sc = ((write_to - 1) >> scb) & (spc - 1)
            t, cnt = _range_type(r, slot, idx + i, first_sc)
            if t != NORMAL or first_sc + cnt <= last_sc:
                skip_cow = False
                break
    if skip_cow:
        return nmeta
    sc_index = (guest >> scb) & (spc - 1)
    t = _subcluster_type(r, slot, idx, sc_index)
    if not keep_old:
        if t == COMPRESSED:
            cow_start_from = 0
        elif t == NORMAL or t == ZERO_ALLOC or t == UNALLOC_ALLOC:
            if g[G_EXTENDED]:
                cow_start_from = min(sc_index, trailing_zeros32(_bitmaps(r, slot, idx)[0])) << scb
            else:
                cow_start_from = 0
        else:
            cow_start_from = sc_index << scb
    else:
        cow_start_from = cow_start_to if t == NORMAL else sc_index << scb
    last = idx + nb_clusters - 1
    sc_index = ((guest + nbytes - 1) >> scb) & (spc - 1)
    t = _subcluster_type(r, slot, last, sc_index)
    if not keep_old:
        if t == COMPRESSED:
            cow_end_to = (cow_end_from + cs - 1) & ~(cs - 1)
        elif t == NORMAL or t == ZERO_ALLOC or t == UNALLOC_ALLOC:
            cow_end_to = (cow_end_from + cs - 1) & ~(cs - 1)
            if g[G_EXTENDED]:
                cow_end_to -= min(spc - sc_index - 1, leading_zeros32(_bitmaps(r, slot, last)[0])) << scb
        else:
            cow_end_to = (cow_end_from + sc_size - 1) & ~(sc_size - 1)
    else:
        cow_end_to = cow_end_from if t == NORMAL else (cow_end_from + sc_size - 1) & ~(sc_size - 1)
    m = r.metas[nmeta]
    m[M_ALLOC] = host_cluster
    m[M_GUEST_CLUSTER] = guest >> cb
    m[M_NB] = nb_clusters
    m[M_KEEP_OLD] = keep_old
    m[M_START_OFF] = cow_start_from
    m[M_START_N] = cow_start_to - cow_start_from
    m[M_END_OFF] = cow_end_from
    m[M_END_N] = cow_end_to - cow_end_from
    m[M_SKIP] = 0
    return nmeta + 1


@njit(cache=True)
def _count_single_write_clusters(im, slot, idx, nb, new_alloc):
    expected = im.ehost[slot, idx]
    i = 0
    while i < nb:
        if _needs_new_alloc(im, slot, idx + i) != new_alloc:
            break
        if not new_alloc:
            if expected != im.ehost[slot, idx + i]:
                break
            expected += 1
        i += 1
    return i


@njit(cache=True)
def _clusters_to_slice_end(g, guest, nbytes):
    cb = g[G_CLUSTER_BITS]
    cs = np.int64(1) << cb
    nb = ((guest & (cs - 1)) + nbytes + cs - 1) >> cb
    in_slice = (guest >> cb) & ((1 << g[G_SLICE_BITS]) - 1)
    return min(nb, (1 << g[G_SLICE_BITS]) - in_slice, REQUEST_MAX_BYTES >> cb)


@njit(cache=True)
def _alloc_host_offset(r, nmeta, offset, nbytes):
    """qcow2_alloc_host_offset: handle_copied / handle_alloc over as many clusters as stay host-contiguous.
    Returns (bytes covered, meta count)."""
    g = r.g
    cb = g[G_CLUSTER_BITS]
    cs = np.int64(1) << cb
    tb = g[G_TABLE_BITS]
    start = offset
    remaining = nbytes
    cluster_offset = INV
    cur = 0
    while True:
        start += cur
        remaining -= cur
        if cluster_offset != INV:
            cluster_offset += cur
        if remaining == 0:
            break
        cur = remaining
        oic = start & (cs - 1)
        gc = start >> cb
        idx = gc & ((1 << tb) - 1)
        # handle_copied
        nb = _clusters_to_slice_end(g, start, cur)
        slot = _get_cluster_table(r, gc, GET)
        if not _needs_new_alloc(r, slot, idx):
            host = r.ehost[slot, idx]
            if cluster_offset != INV and (host << cb) != cluster_offset - oic:
                break
            keep = _count_single_write_clusters(r, slot, idx, nb, False)
            cur = min(cur, keep * cs - oic)
            nmeta = _calculate_l2_meta(r, nmeta, host, start, cur, slot, idx, True)
            cluster_offset = (host << cb) + oic
            continue
        # handle_alloc
        slot = _get_cluster_table(r, gc, GET)
        nb = _count_single_write_clusters(r, slot, idx, nb, True)
        if cluster_offset == INV:
            host = _alloc_flushing(r, -1, nb)
        else:
            host = (cluster_offset - oic) >> cb
            nb = _alloc_flushing(r, host, nb)
            if nb == 0:
                break
        r.cnt[C_CLUSTERS_ALLOCATED] += nb
        cur = min(cur, min(cur + oic, nb * cs) - oic)
        nmeta = _calculate_l2_meta(r, nmeta, host, start, cur, slot, idx, False)
        cluster_offset = (host << cb) + oic
    return nbytes - remaining, nmeta


@njit(cache=True)
def _is_unallocated(r, pos, nbytes):
    """is_unallocated via bdrv_is_allocated_above: one lookup in this image; where this image has nothing, the
    backing image answers (a block-status query in its own cache when it is modelled; taken to hold data when a
    backing file exists but is not modelled)."""
    if nbytes == 0:
        return True
    g = r.g
    n, t = _host_extent(r, r, True, pos, pos + nbytes)
    if not (t == UNALLOC_PLAIN or t == UNALLOC_ALLOC or t == -1):
        return False
    if not g[G_HAS_BACKING_FILE]:
        return n >= nbytes
    if not g[G_BACKING_MODELLED]:
        return False
    _queue_backing(r, pos, n, BACKING_STATUS)
    if pos >= g[G_BACKING_SIZE]:
        return n >= nbytes
    bn, bt = _host_extent(r, r.bim, False, pos, pos + min(n, g[G_BACKING_SIZE] - pos))
    unallocated = bt == UNALLOC_PLAIN or bt == UNALLOC_ALLOC or bt == -1
    return unallocated and min(n, bn) >= nbytes


@njit(cache=True)
def _handle_alloc_space(r, first, last):
    """handle_alloc_space for metas[first:last] (newest first): zero-checks; zero-fill instead of COW when both COW
    regions read as zeroes (host with fast write-zeroes, no backing data)."""
    cs = np.int64(1) << r.g[G_CLUSTER_BITS]
    st = r.state
    cnt = r.cnt
    for j in range(last - 1, first - 1, -1):
        m = r.metas[j]
        if m[M_START_N] == 0 and m[M_END_N] == 0:
            continue
        base = m[M_GUEST_CLUSTER] * cs
        before = st[S_EVENTS]
        zero = _is_unallocated(r, base + m[M_START_OFF], m[M_START_N])
        if zero:
            zero = _is_unallocated(r, base + m[M_END_OFF], m[M_END_N])
        cnt[C_ZERO_CHECKS] += st[S_EVENTS] - before
        if zero:
            m[M_SKIP] = 1
            cnt[C_ZERO_FILL_BYTES] += m[M_END_OFF] + m[M_END_N] - m[M_START_OFF]


@njit(cache=True)
def _link_l2(r, j, prealloc):
    """perform_cow (reads through this image when COW is not skipped) then qcow2_alloc_cluster_link_l2, for
    metas[j]."""
    g = r.g
    cnt = r.cnt
    m = r.metas[j]
    cb = g[G_CLUSTER_BITS]
    cs = np.int64(1) << cb
    scb = g[G_SC_BITS]
    base = m[M_GUEST_CLUSTER] * cs
    if (m[M_START_N] or m[M_END_N]) and not m[M_SKIP] and not prealloc:
        before = r.state[S_EVENTS]
        data_bytes = m[M_END_OFF] - (m[M_START_OFF] + m[M_START_N])
        if m[M_START_N] and m[M_END_N] and data_bytes <= 16384:
            span = m[M_END_OFF] + m[M_END_N] - m[M_START_OFF]
            _read(r, base + m[M_START_OFF], span)
            cnt[C_COW_READ_BYTES] += span
        else:
            if m[M_START_N]:
                _read(r, base + m[M_START_OFF], m[M_START_N])
            if m[M_END_N]:
                _read(r, base + m[M_END_OFF], m[M_END_N])
            cnt[C_COW_READ_BYTES] += m[M_START_N] + m[M_END_N]
        cnt[C_COW_WRITE_BYTES] += m[M_START_N] + m[M_END_N]
        cnt[C_COW_READ_LOOKUPS] += r.state[S_EVENTS] - before
    gc = m[M_GUEST_CLUSTER]
    slot = _get_cluster_table(r, gc, GET_DIRTY)
    idx = gc & ((1 << g[G_TABLE_BITS]) - 1)
    written_to_all = m[M_END_OFF] + m[M_END_N]
    ehost = r.ehost
    eflags = r.eflags
    for i in range(m[M_NB]):
        old = ehost[slot, idx + i]
        if not m[M_KEEP_OLD] and old != 0 and old != m[M_ALLOC] + i and not (eflags[slot, idx + i] & F_COMPRESSED):
            free_cluster(r.used, r.covered, r.alloc, old)
        ehost[slot, idx + i] = m[M_ALLOC] + i
        eflags[slot, idx + i] = F_COPIED
        if g[G_EXTENDED] and not prealloc:
            written_from = max(m[M_START_OFF], i << cb)
            written_to = min(written_to_all, (i + 1) << cb)
            first_sc = (written_from >> scb) & (g[G_SPC] - 1)
            last_sc = ((written_to - 1) >> scb) & (g[G_SPC] - 1)
            bits = np.uint64(((np.int64(1) << (last_sc + 1)) - 1) & ~((np.int64(1) << first_sc) - 1))
            r.ebits[slot, idx + i] = (r.ebits[slot, idx + i] | bits) & ~(bits << np.uint64(32))


@njit(cache=True)
def _write(r, offset, length, prealloc):
    """qcow2_co_pwritev_part: each part's lookups and zero-checks in order; the parts' L2 links come after all
    parts' lookups, as QEMU's concurrent write tasks do. preallocate_co (prealloc) links after each part."""
    cb = r.g[G_CLUSTER_BITS]
    nmeta = 0
    pos = offset
    remaining = length
    max_part = (INT_MAX >> cb) << cb if prealloc else INT_MAX
    parts = 0
    part_first = r.part_first
    part_last = r.part_last
    while remaining > 0:
        first = nmeta
        done, nmeta = _alloc_host_offset(r, nmeta, pos, min(remaining, max_part))
        pos += done
        remaining -= done
        if prealloc:
            for j in range(nmeta - 1, first - 1, -1):
                _link_l2(r, j, True)
            nmeta = 0
            continue
        _handle_alloc_space(r, first, nmeta)
        part_first[parts] = first
        part_last[parts] = nmeta
        parts += 1
    for p in range(parts):
        for j in range(part_last[p] - 1, part_first[p] - 1, -1):
            _link_l2(r, j, False)


@njit(cache=True)
def run_requests(r, op, offset, length, first, last):
    """Process requests [first, last) until done or the event buffers might overflow; returns the next request.

    Room is checked before each request against a bound on the events it can make. Reads and overwrites that are
    one lookup take a fast path, written out here in the loop (numba would count references on every array
    passed to a helper); the tests hold the fast paths to the general code. Everything else follows QEMU's code.
    """
    g = r.g
    st = r.state
    okey = r.okey
    okind = r.okind
    tslot = r.tslot
    ehost = r.ehost
    eflags = r.eflags
    ebits = r.ebits
    cb = g[G_CLUSTER_BITS]
    tb = g[G_TABLE_BITS]
    sb = g[G_SLICE_BITS]
    scb = g[G_SC_BITS]
    spc = g[G_SPC]
    spt = g[G_SLICES_PER_TABLE]
    l1_size = g[G_L1_SIZE]
    extended = g[G_EXTENDED]
    table_mask = (np.int64(1) << tb) - 1
    cluster_mask = (np.int64(1) << cb) - 1
    sc_mask = (np.int64(1) << scb) - 1
    ev_capacity = okey.shape[0]
    fl_capacity = r.oflush.shape[0]
    recording = ev_capacity > 0
    backing_model = g[G_BACKING_MODELLED]
    writethrough = g[G_WRITETHROUGH]
    fast = g[G_FAST_PATHS] != 0 and backing_model == 0  # the tests turn the fast paths off to compare
    max_clusters = 1
    for i in range(first, last):
        if op[i] != OP_PREALLOC:
            n = ((offset[i] & cluster_mask) + np.int64(length[i]) + cluster_mask) >> cb
            max_clusters = max(max_clusters, n)
    rows = max(2 * max_clusters, 2 * spt) + 8
    if r.metas.shape[0] < rows:
        r.metas = np.zeros((rows, META_WIDTH), dtype=np.int64)
        r.part_first = np.empty(rows, dtype=np.int64)
        r.part_last = np.empty(rows, dtype=np.int64)
    # Tallies and the event count stay in registers; the arrays are written back around the general paths.
    requests = reads = writes = flushes = discards = read_bytes = write_bytes = 0
    events = st[S_EVENTS]
    stop = last
    for i in range(first, last):
        ln = np.int64(length[i])
        pos = offset[i]
        n_clusters = ((pos & cluster_mask) + ln + cluster_mask) >> cb
        n_tables = (n_clusters >> tb) + 2
        bound = n_clusters * (2 * spc + 8) + n_tables * (spt + 8) + 16
        if recording and (events + bound > ev_capacity or st[S_FLUSHES] + n_clusters + n_tables + 2 > fl_capacity
                          or (backing_model and st[S_BACKING] + bound > r.bqoff.shape[0])):
            stop = i
            break
        o = op[i]
        requests += 1
        if o == OP_READ:
            reads += 1
            read_bytes += ln
            if fast and ln > 0:
                # One extent: inside one subcluster, or (without extended_l2) inside one slice with clusters of one
                # type, host-contiguous where allocated. Without an L2 table there is no lookup at all.
                gc = pos >> cb
                l1 = gc >> tb
                slot = tslot[l1] if l1 < l1_size else -1
                idx = gc & table_mask
                one = (pos & sc_mask) + ln <= sc_mask + 1
                if not one and not extended:
                    last_gc = (pos + ln - 1) >> cb
                    one = (last_gc >> sb) == (gc >> sb)
                    if one and slot >= 0:
                        f0 = eflags[slot, idx] & (F_ZERO | F_COMPRESSED)
                        h0 = ehost[slot, idx]
                        one = (f0 & F_COMPRESSED) == 0
                        for j in range(1, last_gc - gc + 1):
                            h = ehost[slot, idx + j]
                            if (eflags[slot, idx + j] & (F_ZERO | F_COMPRESSED)) != f0 or (h != 0) != (h0 != 0) \
                                    or (h0 != 0 and h != h0 + j):
                                one = False
                                break
                if one:
                    if slot >= 0 and recording:
                        okey[events] = slot * spt + (idx >> sb)
                        okind[events] = GET
                        events += 1
                    continue
        elif o == OP_WRITE or o == OP_PREALLOC:
            writes += 1
            write_bytes += ln
            if fast and o == OP_WRITE and ln > 0:
                # An overwrite in place: inside one slice, every cluster allocated with COPIED, host-contiguous,
                # every written subcluster holding data -- handle_copied keeps them, calculate_l2_meta skips COW,
                # nothing is linked.
                gc = pos >> cb
                last_gc = (pos + ln - 1) >> cb
                l1 = gc >> tb
                slot = tslot[l1] if l1 < l1_size else -1
                idx = gc & table_mask
                one = slot >= 0 and (last_gc >> sb) == (gc >> sb)
                if one:
                    h0 = ehost[slot, idx]
                    for j in range(last_gc - gc + 1):
                        f = eflags[slot, idx + j]
                        if h0 == 0 or ehost[slot, idx + j] != h0 + j or (f & F_COPIED) == 0 or \
                                (f & (F_COMPRESSED | F_ZERO)) != 0:
                            one = False
                            break
                        if extended:
                            first_sc = 0 if j > 0 else (pos & cluster_mask) >> scb
                            last_sc = spc - 1 if gc + j < last_gc else ((pos + ln - 1) & cluster_mask) >> scb
                            want = ((np.int64(1) << (last_sc + 1)) - 1) & ~((np.int64(1) << first_sc) - 1)
                            bitmap = np.int64(ebits[slot, idx + j])
                            if (bitmap & want) != want or ((bitmap >> 32) & want) != 0:
                                one = False
                                break
                if one:
                    if recording:
                        okey[events] = slot * spt + (idx >> sb)
                        okind[events] = GET
                        events += 1
                    if writethrough:
                        st[S_EVENTS] = events
                        _flush(r)
                        events = st[S_EVENTS]
                    continue
        elif o == OP_FLUSH:
            flushes += 1
        elif o == OP_DISCARD:
            discards += 1  # QEMU ignores discards unless opened with discard=unmap
            continue
        st[S_EVENTS] = events
        if o == OP_READ:
            _read(r, pos, ln)
        elif o == OP_WRITE or o == OP_PREALLOC:
            _write(r, pos, ln, o == OP_PREALLOC)
            if writethrough and o == OP_WRITE:
                _flush(r)
        elif o == OP_STATUS:  # a block-status query from the image above: one extent's lookup
            _host_extent(r, r, True, pos, pos + ln)
        elif o == OP_FLUSH:
            _flush(r)
        events = st[S_EVENTS]
    st[S_EVENTS] = events
    cnt = r.cnt
    cnt[C_REQUESTS] += requests
    cnt[C_READS] += reads
    cnt[C_READ_BYTES] += read_bytes
    cnt[C_WRITES] += writes
    cnt[C_WRITE_BYTES] += write_bytes
    cnt[C_FLUSHES] += flushes
    cnt[C_DISCARDS] += discards
    return stop
