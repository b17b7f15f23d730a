"""The request loop: ``run_requests`` processes requests until done or the event buffers might overflow, with the
fast paths for reads and overwrites that are one lookup written out in the loop."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..codes import F_COMPRESSED, F_COPIED, F_ZERO, GET
from ..codes import (DISCARD as OP_DISCARD, FLUSH as OP_FLUSH, PREALLOC as OP_PREALLOC, READ as OP_READ,
                     STATUS as OP_STATUS, WRITE as OP_WRITE)
from .discard import discard
from .lookup import read, status
from ..hostalloc import RS_COUNT
from .structs import (C_DISCARD_BYTES, C_DISCARDS, C_FLUSHES, C_READS, C_READ_BYTES, C_REQUESTS, C_WRITES,
                      C_WRITE_BYTES, G_BACKING_MODELLED, G_CLUSTER_BITS, G_DISCARD_UNMAP, G_EXTENDED, G_FAST_PATHS,
                      G_L1_SIZE, G_SC_BITS, G_SLICES_PER_TABLE, G_SLICE_BITS, G_SPC, G_TABLE_BITS, G_WRITETHROUGH,
                      META_WIDTH, S_BACKING, S_EVENTS, S_FLUSHES)
from .write import guest_flush, write


@njit(cache=True, nogil=True)
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
    # The fast paths read dense rows directly (the tables the image held when loaded; stage1.entries says how
    # entries are stored): a table created during the replay, kept sparse, takes the general path, so no hash
    # probe sits in this loop.
    ehost = r.ehost
    eflags = r.eflags
    ebits = r.ebits
    dense = ehost.shape[0]
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
    rl_capacity = r.rlog.shape[0]
    rst = r.rst
    blocks = r.covered.shape[0]
    recording = ev_capacity > 0
    backing_model = g[G_BACKING_MODELLED]
    writethrough = g[G_WRITETHROUGH]
    unmap = g[G_DISCARD_UNMAP]
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
    requests = reads = writes = flushes = discards = read_bytes = write_bytes = discard_bytes = 0
    events = st[S_EVENTS]
    stop = last
    for i in range(first, last):
        ln = np.int64(length[i])
        pos = offset[i]
        n_clusters = ((pos & cluster_mask) + ln + cluster_mask) >> cb
        n_tables = (n_clusters >> tb) + 2
        bound = n_clusters * (2 * spc + 8) + n_tables * (spt + 8) + 16
        if recording and (events + bound > ev_capacity or st[S_FLUSHES] + n_clusters + n_tables + 2 > fl_capacity
                          or (backing_model and st[S_BACKING] + bound > r.bqoff.shape[0])
                          or rst[RS_COUNT] + 2 * bound + 4 * blocks + 64 > rl_capacity):
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
                    if one and slot >= dense:
                        one = False
                    elif one and slot >= 0:
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
                one = 0 <= slot < dense and (last_gc >> sb) == (gc >> sb)
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
                        guest_flush(r)
                        events = st[S_EVENTS]
                    continue
        elif o == OP_FLUSH:
            flushes += 1
        elif o == OP_DISCARD:
            discards += 1
            discard_bytes += ln
            if not unmap:  # discard=ignore: bdrv_co_pdiscard returns before the driver sees it
                continue
        st[S_EVENTS] = events
        if o == OP_READ:
            read(r, pos, ln)
        elif o == OP_WRITE or o == OP_PREALLOC:
            write(r, pos, ln, o == OP_PREALLOC)
            if writethrough and o == OP_WRITE:
                guest_flush(r)
        elif o == OP_DISCARD:
            discard(r, pos, ln)  # no flush after it, even in writethrough (blk_co_do_pdiscard)
        elif o == OP_STATUS:  # a block-status query from the image above
            status(r, pos, ln)
        elif o == OP_FLUSH:
            guest_flush(r)
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
    cnt[C_DISCARD_BYTES] += discard_bytes
    return stop
