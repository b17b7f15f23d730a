"""The structs stage 1's arrays travel in (numba structrefs holding borrowed views), the names of their fields and
of the index vectors' slots (G_* geometry and options, S_* run state, C_* counters, M_* QCowL2Meta rows), and the
recording of events: ``emit`` one cache event, ``flush`` a whole-cache flush, ``slice_key`` an event's key."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import carray, config, njit, types
from numba.experimental import structref
from numba.extending import intrinsic

from ..codes import R_L2_FLUSH
from ..hostalloc import RS_AT, log

# geometry/options vector (int64) indices
(G_CLUSTER_BITS, G_TABLE_BITS, G_SLICE_BITS, G_SC_BITS, G_EXTENDED, G_SPC, G_SLICES_PER_TABLE, G_L1_SIZE,
 G_HAS_BACKING_FILE, G_WRITETHROUGH, G_BACKING_MODELLED, G_BACKING_SIZE, G_FAST_PATHS, G_VIRTUAL_SIZE,
 G_DISCARD_UNMAP, G_DISCARD_NO_UNREF, G_DATA_FILE) = range(17)
GEOMETRY_SIZE = 17
# run state (int64) indices. S_REFCOUNT_DEPENDS_ON_L2: the refcount cache depends on the L2 cache (QEMU's
# qcow2_cache_set_dependency after a refcount decrease), so the next flush of the refcount cache, or the next
# L2 link, flushes the whole L2 cache first.
# S_SCANNED: qcow2_detect_metadata_preallocation has run (once per open); S_REQUEST_HIGH_WATER: one past the last
# host cluster written before the data of the current write (its new L2 tables are written by l2_allocate);
# S_REQUEST_DATA: data clusters the current write allocated (not yet written when its zero-checks run);
# S_WRITTEN_BYTES: bytes the image file gained on disk since the open (new metadata clusters whole, data as written
# in 4 KiB filesystem blocks, less freed clusters): what st_blocks says at the preallocation scan.
S_EVENTS, S_FLUSHES, S_SLOTS, S_BACKING, S_REFCOUNT_DEPENDS_ON_L2, S_SCANNED, S_REQUEST_HIGH_WATER, \
    S_REQUEST_DATA, S_WRITTEN_BYTES = range(9)
STATE_SIZE = 9
# counters (int64) indices
(C_REQUESTS, C_READS, C_WRITES, C_FLUSHES, C_DISCARDS, C_READ_BYTES, C_WRITE_BYTES, C_COW_READ_BYTES,
 C_COW_WRITE_BYTES, C_ZERO_FILL_BYTES, C_TABLES_ALLOCATED, C_CLUSTERS_ALLOCATED, C_ZERO_CHECKS,
 C_COW_READ_LOOKUPS, C_CLUSTERS_DISCARDED, C_CLUSTERS_FREED, C_HOST_DISCARDS, C_HOST_DISCARD_BYTES,
 C_DISCARD_BYTES, C_REFCOUNT_DROPS, C_RACING_SPLIT_WRITES) = range(21)
COUNTER_NAMES = ("requests", "reads", "writes", "flushes", "discards", "guest_read_bytes",
                 "guest_write_bytes", "cow_read_bytes", "cow_write_bytes", "zero_fill_bytes", "l2_tables_allocated",
                 "clusters_allocated", "zero_check_lookups", "cow_read_lookups", "clusters_discarded",
                 "clusters_freed", "discards_to_host", "discarded_bytes", "guest_discard_bytes",
                 "refcount_drops", "racing_split_writes")
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
    slot -> host cluster of the table ``thost``, and the L2 entries: dense rows per slot and entry (host cluster
    ``ehost`` (0: none), ``eflags`` (F_*), extended-L2 bitmap ``ebits``) for the first ``ehost.shape[0]`` slots,
    the sparse hash ``skey`` / ``shost`` / ``sflags`` / ``sbits`` / ``sstate`` for the others (read and written
    only through qsim.stage1.entries)."""


L2_VIEW_FIELDS = ["g", "tslot", "thost", "ehost", "eflags", "ebits", "skey", "shost", "sflags", "sbits", "sstate"]
structref.define_proxy(L2View, L2ViewType, L2_VIEW_FIELDS)


@structref.register
class RunType(types.StructRef):
    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


class Run(structref.StructRefProxy):
    """A kernel run: the image's L2 mapping in L2View's own fields (so a Run serves wherever an L2View does, without
    reading a nested struct), the qcow2 layers of the backing chain below it, nearest first, ``below`` (a list of
L2Views: what the zero-check asks of the chain), the host allocator's maps (``used``,
    ``covered``, ``alloc``: see qsim.hostalloc), event buffers (``okey``, ``okind``, ``oflush``), the backing-request
    queue (``bqoff``, ``bqlen``, ``bqkind``), run state ``state`` (S_*), counters ``cnt`` (C_*), the refcount-cache
    log (``rlog``, ``rst``: see qsim.hostalloc) and scratch rows for QCowL2Meta (``metas``) and write parts
    (``part_first``, ``part_last``)."""


RUN_FIELDS = L2_VIEW_FIELDS + ["below", "used", "covered", "alloc", "okey", "okind", "oflush", "state", "bqoff",
                               "bqlen", "bqkind", "cnt", "rlog", "rst", "metas", "part_first", "part_last"]
structref.define_proxy(Run, RunType, RUN_FIELDS)


if config.DISABLE_JIT:  # plain Python (the tests' reference run of this same code): the fields on plain objects
    def new_l2_view(g, tslot, thost, ehost, eflags, ebits, skey, shost, sflags, sbits, sstate):
        return SimpleNamespace(g=g, tslot=tslot, thost=thost, ehost=ehost, eflags=eflags, ebits=ebits, skey=skey,
                               shost=shost, sflags=sflags, sbits=sbits, sstate=sstate)

    def new_run(g, tslot, thost, ehost, eflags, ebits, skey, shost, sflags, sbits, sstate, below, used, covered,
                alloc, okey, okind, oflush, state, bqoff, bqlen, bqkind, cnt, rlog, rst):
        metas, part_first, part_last = _scratch_rows()
        return SimpleNamespace(g=g, tslot=tslot, thost=thost, ehost=ehost, eflags=eflags, ebits=ebits, skey=skey,
                               shost=shost, sflags=sflags, sbits=sbits, sstate=sstate, below=below,
                               used=used, covered=covered, alloc=alloc, okey=okey, okind=okind, oflush=oflush,
                               state=state, bqoff=bqoff, bqlen=bqlen, bqkind=bqkind, cnt=cnt, rlog=rlog, rst=rst,
                               metas=metas, part_first=part_first, part_last=part_last)
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
    def new_l2_view(g, tslot, thost, ehost, eflags, ebits, skey, shost, sflags, sbits, sstate):
        """An L2View (built in compiled code, so its constructor is cached with the rest)."""
        return L2View(_borrowed(g), _borrowed(tslot), _borrowed(thost), _borrowed(ehost), _borrowed(eflags),
                      _borrowed(ebits), _borrowed(skey), _borrowed(shost), _borrowed(sflags), _borrowed(sbits),
                      _borrowed(sstate))

    @njit(cache=True)
    def new_run(g, tslot, thost, ehost, eflags, ebits, skey, shost, sflags, sbits, sstate, below, used, covered,
                alloc, okey, okind, oflush, state, bqoff, bqlen, bqkind, cnt, rlog, rst):
        """A Run over the image's arrays (L2View's fields) and the chain's qcow2 layers ``below`` (a typed list of
        L2Views); run_requests sizes its scratch rows."""
        metas, part_first, part_last = _scratch_rows()
        return Run(_borrowed(g), _borrowed(tslot), _borrowed(thost), _borrowed(ehost), _borrowed(eflags),
                   _borrowed(ebits), _borrowed(skey), _borrowed(shost), _borrowed(sflags), _borrowed(sbits),
                   _borrowed(sstate), below, _borrowed(used), _borrowed(covered), _borrowed(alloc), _borrowed(okey),
                   _borrowed(okind), _borrowed(oflush), _borrowed(state), _borrowed(bqoff), _borrowed(bqlen),
                   _borrowed(bqkind), _borrowed(cnt), _borrowed(rlog), _borrowed(rst), metas, part_first, part_last)


@njit(cache=True)
def _scratch_rows():
    return np.zeros((1, META_WIDTH), np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64)


@njit(cache=True, inline="always")
def emit(r, key, kind):
    if r.okey.shape[0] == 0:  # not recording (building a preallocated image)
        return
    st = r.state
    n = st[S_EVENTS]
    r.okey[n] = key
    r.okind[n] = kind
    st[S_EVENTS] = n + 1


@njit(cache=True)
def l2_flush_only(r):
    """A whole L2-cache flush in the L2 stream (its refcount-log marker is the caller's)."""
    if r.oflush.shape[0] == 0:
        return
    st = r.state
    r.oflush[st[S_FLUSHES]] = st[S_EVENTS]
    st[S_FLUSHES] += 1


@njit(cache=True)
def rc_log(r, key, kind):
    """One refcount-cache operation (codes.R_*), stamped with the L2 events so far."""
    r.rst[RS_AT] = r.state[S_EVENTS]
    log(r.rlog, r.rst, key, kind, 1)


@njit(cache=True)
def flush(r):
    """A whole L2-cache flush, in the L2 stream and (as R_L2_FLUSH) in the refcount log."""
    rc_log(r, 0, R_L2_FLUSH)
    l2_flush_only(r)


@njit(cache=True, inline="always")
def slice_key(g, slot, idx):
    return slot * g[G_SLICES_PER_TABLE] + (idx >> g[G_SLICE_BITS])
