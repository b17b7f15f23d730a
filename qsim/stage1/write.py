"""The write path: handle_copied and handle_alloc over host-contiguous runs (qcow2_alloc_host_offset), the
allocator with its refcount-block flushes, l2_allocate, calculate_l2_meta's COW regions, the zero-checks of
handle_alloc_space, perform_cow and qcow2_alloc_cluster_link_l2."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..bitops import leading_zeros32, trailing_zeros32
from ..codes import (BACKING_STATUS, COMPRESSED, F_COMPRESSED, F_COPIED, GET, GET_DIRTY, GET_EMPTY, NORMAL,
                     R_FLUSH, R_GET_DIRTY, R_L2_DEP_FLUSH, R_L2_DEPENDS, R_RC_DEPENDS, UNALLOC_ALLOC, ZERO_ALLOC,
                     ZERO_PLAIN)
from ..hostalloc import (CLUSTER_BITS as CLUSTER_BITS_, HIGH_WATER,
                         REFBLOCK_BITS, REFBLOCKS_MADE, RS_AT, RS_L2_FLUSHES, alloc_clusters, alloc_clusters_at,
                         free_cluster)
from .entries import data_file_host, entry, entry_bitmap, entry_host, set_entry, set_entry_bitmap
from .lookup import (bitmaps, detect_metadata_preallocation, subcluster_type, range_type, host_extent, read,
                     queue_backing, unallocated, zero_below)
from .structs import (C_CLUSTERS_ALLOCATED, C_COW_READ_BYTES, C_COW_READ_LOOKUPS, C_COW_WRITE_BYTES, C_REFCOUNT_DROPS,
                      C_RACING_SPLIT_WRITES, C_TABLES_ALLOCATED, C_ZERO_CHECKS, C_ZERO_FILL_BYTES,
                      G_BACKING_MODELLED, G_CLUSTER_BITS, G_DATA_FILE, G_EXTENDED, G_SC_BITS,
                      G_SLICES_PER_TABLE, G_SLICE_BITS, G_SPC, G_TABLE_BITS, G_VIRTUAL_SIZE, M_ALLOC, M_END_N,
                      M_END_OFF, M_GUEST_CLUSTER, M_KEEP_OLD, M_NB, M_SKIP, M_START_N, M_START_OFF, S_EVENTS,
                      S_FLUSHES, S_REFCOUNT_DEPENDS_ON_L2, S_REQUEST_DATA, S_REQUEST_HIGH_WATER, S_SCANNED, S_SLOTS,
                      S_WRITTEN_BYTES, INT_MAX, REQUEST_MAX_BYTES, INV, emit, flush, l2_flush_only, rc_log, slice_key)


@njit(cache=True)
def _needs_new(host, flags):
    """cluster_needs_new_alloc of an entry's host cluster and flags: only an allocated (normal or zero-allocated)
    cluster with COPIED is kept."""
    return (flags & F_COMPRESSED) != 0 or host == 0 or (flags & F_COPIED) == 0


@njit(cache=True)
def _needs_new_alloc(im, slot, idx):
    h, f = entry(im, slot, idx)
    return _needs_new(h, f)


@njit(cache=True)
def alloc_flushing(r, at, n):
    """qcow2_alloc_clusters (at < 0: first host cluster) or qcow2_alloc_clusters_at (how many). Creating a refcount
    block on the way flushes the L2 cache first (alloc_refcount_block), once per block."""
    alloc = r.alloc
    before = alloc[REFBLOCKS_MADE]
    r.rst[RS_AT] = r.state[S_EVENTS]
    r.rst[RS_L2_FLUSHES] = 0
    if at < 0:
        result = alloc_clusters(r.used, r.covered, alloc, r.rlog, r.rst, n)
    else:
        result = alloc_clusters_at(r.used, r.covered, alloc, r.rlog, r.rst, at, n)
    for _ in range(r.rst[RS_L2_FLUSHES]):  # alloc_refcount_block's L2 flushes (their markers are in the log)
        l2_flush_only(r)
    r.state[S_WRITTEN_BYTES] += (alloc[REFBLOCKS_MADE] - before) << alloc[CLUSTER_BITS_]
    if alloc[REFBLOCKS_MADE] != before:  # its refcount-cache flush cleared the refcount cache's dependency
        r.state[S_REFCOUNT_DEPENDS_ON_L2] = 0
    return result


@njit(cache=True)
def flush_refcount_dependency(r):
    """qcow2_cache_flush_dependency: while the refcount cache depends on the L2 cache (a refcount dropped since
    the refcount cache was last written), flushing the refcount cache (l2_allocate) or making the L2 cache depend
    on it (an L2 link) first flushes the whole L2 cache."""
    if r.state[S_REFCOUNT_DEPENDS_ON_L2]:
        rc_log(r, 0, R_L2_DEP_FLUSH)
        l2_flush_only(r)
        r.state[S_REFCOUNT_DEPENDS_ON_L2] = 0


@njit(cache=True)
def guest_flush(r):
    """qcow2_write_caches (a guest flush, writethrough's flush after each write): the L2 cache, then the
    refcount cache, whose dependency on the L2 cache is then cleared."""
    flush(r)
    rc_log(r, 0, R_FLUSH)
    r.state[S_REFCOUNT_DEPENDS_ON_L2] = 0


@njit(cache=True)
def free_any_cluster(r, host, flags):
    """qcow2_free_any_cluster of the cluster at host cluster ``host``: its refcount drops (update_refcount, which
    makes the refcount cache depend on the L2 cache). With COPIED the refcount was 1, so the cluster is free again
    and the allocator's free_cluster_index moves back to it; without COPIED (shared by a snapshot: refcount 2 or
    more) it stays allocated, and so do a compressed cluster's host clusters (shared with other compressed
    clusters; qsim keeps no per-cluster refcounts). With an external data file nothing is freed and no refcount
    changes: the cluster lives in the data file, which has no refcounts (the data file may get a discard).
    Returns whether the cluster was freed."""
    if r.g[G_DATA_FILE]:
        return False
    r.state[S_REFCOUNT_DEPENDS_ON_L2] = 1
    r.cnt[C_REFCOUNT_DROPS] += 1
    if not (flags & F_COPIED) or (flags & F_COMPRESSED):
        rc_log(r, 0, R_RC_DEPENDS)  # the refcount drops in its block, the cluster stays allocated
        rc_log(r, host >> r.alloc[REFBLOCK_BITS], R_GET_DIRTY)
        return False
    r.rst[RS_AT] = r.state[S_EVENTS]
    free_cluster(r.used, r.covered, r.alloc, r.rlog, r.rst, host)
    r.state[S_WRITTEN_BYTES] -= np.int64(1) << r.alloc[CLUSTER_BITS_]  # its hole punched in the file
    return True


@njit(cache=True)
def l2_allocate(r, l1):
    """l2_allocate: a host cluster for the table, a refcount-cache flush, get_empty (dirty) for each slice, flush
    the whole L2 cache."""
    g = r.g
    host = alloc_flushing(r, -1, 1)
    flush_refcount_dependency(r)
    rc_log(r, 0, R_FLUSH)  # qcow2_cache_flush(bs, s->refcount_block_cache)
    r.state[S_REQUEST_HIGH_WATER] = max(r.state[S_REQUEST_HIGH_WATER], host + 1)  # the table is written now
    r.state[S_WRITTEN_BYTES] += np.int64(1) << g[G_CLUSTER_BITS]
    slot = r.state[S_SLOTS]
    r.state[S_SLOTS] = slot + 1
    r.tslot[l1] = slot
    r.thost[slot] = host
    for s in range(g[G_SLICES_PER_TABLE]):
        emit(r, slot * g[G_SLICES_PER_TABLE] + s, GET_EMPTY)
    flush(r)
    r.cnt[C_TABLES_ALLOCATED] += 1
    return slot


@njit(cache=True)
def get_cluster_table(r, gc, kind):
    """get_cluster_table: the slice holding guest cluster gc, allocating the L2 table first if there is none."""
    g = r.g
    l1 = gc >> g[G_TABLE_BITS]
    slot = r.tslot[l1]
    if slot < 0:
        slot = l2_allocate(r, l1)
    emit(r, slice_key(g, slot, gc & ((1 << g[G_TABLE_BITS]) - 1)), kind)
    return slot


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
            t, cnt = range_type(r, slot, idx + i, first_sc)
            if t != NORMAL or first_sc + cnt <= last_sc:
                skip_cow = False
                break
    if skip_cow:
        return nmeta
    sc_index = (guest >> scb) & (spc - 1)
    t = subcluster_type(r, slot, idx, sc_index)
    if not keep_old:
        if t == COMPRESSED:
            cow_start_from = 0
        elif t == NORMAL or t == ZERO_ALLOC or t == UNALLOC_ALLOC:
            if g[G_EXTENDED]:
                cow_start_from = min(sc_index, trailing_zeros32(bitmaps(r, slot, idx)[0])) << scb
            else:
                cow_start_from = 0
        else:
            cow_start_from = sc_index << scb
    else:
        cow_start_from = cow_start_to if t == NORMAL else sc_index << scb
    last = idx + nb_clusters - 1
    sc_index = ((guest + nbytes - 1) >> scb) & (spc - 1)
    t = subcluster_type(r, slot, last, sc_index)
    if not keep_old:
        if t == COMPRESSED:
            cow_end_to = (cow_end_from + cs - 1) & ~(cs - 1)
        elif t == NORMAL or t == ZERO_ALLOC or t == UNALLOC_ALLOC:
            cow_end_to = (cow_end_from + cs - 1) & ~(cs - 1)
            if g[G_EXTENDED]:
                cow_end_to -= min(spc - sc_index - 1, leading_zeros32(bitmaps(r, slot, last)[0])) << scb
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
    eh = im.ehost
    if slot < eh.shape[0]:  # a dense row, read in place (the struct's fields fetched once, not per cluster)
        ef = im.eflags
        expected = eh[slot, idx]
        i = 0
        while i < nb:
            h = eh[slot, idx + i]
            f = ef[slot, idx + i]
            if _needs_new(h, f) != new_alloc:
                break
            if not new_alloc:
                if expected != h:
                    break
                expected += 1
            i += 1
        return i
    expected = entry_host(im, slot, idx)
    i = 0
    while i < nb:
        if _needs_new_alloc(im, slot, idx + i) != new_alloc:
            break
        if not new_alloc:
            if expected != entry_host(im, slot, idx + i):
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
        slot = get_cluster_table(r, gc, GET)
        if not _needs_new_alloc(r, slot, idx):
            host = entry_host(r, slot, idx)
            if cluster_offset != INV and (host << cb) != cluster_offset - oic:
                break
            keep = _count_single_write_clusters(r, slot, idx, nb, False)
            cur = min(cur, keep * cs - oic)
            nmeta = _calculate_l2_meta(r, nmeta, host, start, cur, slot, idx, True)
            cluster_offset = (host << cb) + oic
            continue
        # handle_alloc
        slot = get_cluster_table(r, gc, GET)
        nb = _count_single_write_clusters(r, slot, idx, nb, True)
        if r.g[G_DATA_FILE]:  # do_alloc_cluster_offset: the data file's cluster is the guest cluster, nothing
            host = data_file_host(gc)  # is allocated (nor refcounted) for it
        elif cluster_offset == INV:
            host = alloc_flushing(r, -1, nb)
        else:
            host = (cluster_offset - oic) >> cb
            nb = alloc_flushing(r, host, nb)
            if nb == 0:
                break
        r.cnt[C_CLUSTERS_ALLOCATED] += nb
        r.state[S_REQUEST_DATA] += nb
        cur = min(cur, min(cur + oic, nb * cs) - oic)
        nmeta = _calculate_l2_meta(r, nmeta, host, start, cur, slot, idx, False)
        cluster_offset = (host << cb) + oic
    return nbytes - remaining, nmeta


@njit(cache=True)
def _is_zero(r, pos, nbytes):
    """is_zero_cow's bdrv_co_is_zero_fast. bdrv_co_block_status cuts the query at the end of the disk: a COW
    region past it (the tail of a partial last cluster) is answered BDRV_BLOCK_EOF without a lookup, and one that
    reaches past it is shorter than asked; either way it does not count as zeroes, so the COW is done."""
    if nbytes == 0:
        return True
    size = r.g[G_VIRTUAL_SIZE]
    if pos >= size:
        return False
    if pos + nbytes > size:
        _reads_as_zero(r, pos, size - pos)
        return False
    return _reads_as_zero(r, pos, nbytes)


@njit(cache=True)
def _reads_as_zero(r, pos, nbytes):
    """The block status of [pos, pos + nbytes): one lookup in this image; zero clusters here are zeroes; where this
    image has nothing, the chain below answers (its first qcow2 layer is asked a block-status query in its own
    cache, and passes on what it lacks). The image's first block-status query scans refcounts first."""
    if not r.state[S_SCANNED]:
        detect_metadata_preallocation(r)
    n, t = host_extent(r, r, True, pos, pos + nbytes)
    if t == ZERO_PLAIN or t == ZERO_ALLOC:  # reads as zeroes in this image (BDRV_BLOCK_ZERO), whatever lies below
        return n >= nbytes
    if not unallocated(t):
        return False
    if r.g[G_BACKING_MODELLED]:
        queue_backing(r, pos, n, BACKING_STATUS)
    return zero_below(r, pos, n) >= nbytes


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
        zero = _is_zero(r, base + m[M_START_OFF], m[M_START_N])
        if zero:
            zero = _is_zero(r, base + m[M_END_OFF], m[M_END_N])
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
            read(r, base + m[M_START_OFF], span)
            cnt[C_COW_READ_BYTES] += span
        else:
            if m[M_START_N]:
                read(r, base + m[M_START_OFF], m[M_START_N])
            if m[M_END_N]:
                read(r, base + m[M_END_OFF], m[M_END_N])
            cnt[C_COW_READ_BYTES] += m[M_START_N] + m[M_END_N]
        cnt[C_COW_WRITE_BYTES] += m[M_START_N] + m[M_END_N]
        cnt[C_COW_READ_LOOKUPS] += r.state[S_EVENTS] - before
    if not prealloc and not r.g[G_DATA_FILE]:  # the data and COW written: whole 4 KiB blocks of the image file
        written_from = (m[M_ALLOC] << cb) + (m[M_START_OFF] & ~np.int64(4095))
        written_to = (m[M_ALLOC] << cb) + ((m[M_END_OFF] + m[M_END_N] + 4095) & ~np.int64(4095))
        r.state[S_WRITTEN_BYTES] += written_to - written_from
    gc = m[M_GUEST_CLUSTER]
    flush_refcount_dependency(r)  # qcow2_cache_set_dependency(l2, refcount)
    rc_log(r, 0, R_L2_DEPENDS)
    slot = get_cluster_table(r, gc, GET_DIRTY)
    idx = gc & ((1 << g[G_TABLE_BITS]) - 1)
    written_to_all = m[M_END_OFF] + m[M_END_N]
    eh = r.ehost  # a dense row is written in place (the struct's fields fetched once, not per cluster)
    ef = r.eflags
    dense = slot < eh.shape[0]
    for i in range(m[M_NB]):
        if dense:
            old, old_flags = eh[slot, idx + i], ef[slot, idx + i]
        else:
            old, old_flags = entry(r, slot, idx + i)
        if not m[M_KEEP_OLD] and old != 0 and old != m[M_ALLOC] + i:
            free_any_cluster(r, old, old_flags)  # a compressed cluster's refcount drops too
        if dense:
            eh[slot, idx + i] = m[M_ALLOC] + i
            ef[slot, idx + i] = F_COPIED
        else:
            set_entry(r, slot, idx + i, m[M_ALLOC] + i, F_COPIED)
        if g[G_EXTENDED] and not prealloc:
            written_from = max(m[M_START_OFF], i << cb)
            written_to = min(written_to_all, (i + 1) << cb)
            first_sc = (written_from >> scb) & (g[G_SPC] - 1)
            last_sc = ((written_to - 1) >> scb) & (g[G_SPC] - 1)
            bits = np.uint64(((np.int64(1) << (last_sc + 1)) - 1) & ~((np.int64(1) << first_sc) - 1))
            set_entry_bitmap(r, slot, idx + i, (entry_bitmap(r, slot, idx + i) | bits) & ~(bits << np.uint64(32)))


@njit(cache=True)
def write(r, offset, length, prealloc):
    """qcow2_co_pwritev_part: each part's lookups and zero-checks in order; the parts' L2 links come after all
    parts' lookups, as QEMU's concurrent write tasks do. preallocate_co (prealloc) links after each part.

    Where QEMU itself is not deterministic: a write split into parts runs them as parallel tasks
    (aio_task_pool), so when a later part's allocation flushes the L2 cache (a new L2 table or refcount block), an
    earlier part's link may dirty its slice before or after that flush, as I/O timing decides: write-backs vary
    from run to run (counted in C_RACING_SPLIT_WRITES)."""
    cb = r.g[G_CLUSTER_BITS]
    nmeta = 0
    pos = offset
    remaining = length
    max_part = (INT_MAX >> cb) << cb if prealloc else INT_MAX
    parts = 0
    part_first = r.part_first
    part_last = r.part_last
    flushes_after_first_part = 0
    r.state[S_REQUEST_HIGH_WATER] = r.alloc[HIGH_WATER]
    r.state[S_REQUEST_DATA] = 0
    while remaining > 0:
        if parts == 1:
            flushes_after_first_part = r.state[S_FLUSHES]
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
    if parts > 1 and r.state[S_FLUSHES] > flushes_after_first_part:
        r.cnt[C_RACING_SPLIT_WRITES] += 1
    for p in range(parts):
        for j in range(part_last[p] - 1, part_first[p] - 1, -1):
            _link_l2(r, j, False)
