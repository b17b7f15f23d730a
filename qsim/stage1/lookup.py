"""The lookup path (qcow2_get_host_offset and its helpers): subcluster types from an L2 entry, one extent per
lookup, the lookups of a read, and what is asked of a modelled backing image."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..bitops import trailing_zeros32
from ..codes import (BACKING_READ, BACKING_STATUS, COMPRESSED, F_COMPRESSED, F_ZERO, GET, NORMAL, UNALLOC_ALLOC,
                     UNALLOC_PLAIN, ZERO_ALLOC, ZERO_PLAIN)
from ..hostalloc import ALLOCATED_AT_OPEN, CLUSTER_BITS, FILE_CLUSTERS_AT_OPEN, RS_AT, log_lookups
from .entries import entry, entry_bitmap, entry_host
from .structs import (G_BACKING_MODELLED, G_BACKING_SIZE, G_CLUSTER_BITS, G_EXTENDED, G_HAS_BACKING_FILE, G_SC_BITS,
                      G_SLICE_BITS, G_SPC, G_L1_SIZE, G_TABLE_BITS, S_BACKING, S_EVENTS, S_REQUEST_HIGH_WATER,
                      S_SCANNED, S_WRITTEN_BYTES, emit, slice_key)


@njit(cache=True, inline="always")
def bitmaps(im, slot, idx):
    """(allocation bits, zero bits) of an extended L2 entry, as int64 (bits 0-31 and 32-63 of the bitmap)."""
    bitmap = entry_bitmap(im, slot, idx)
    return np.int64(bitmap & np.uint64(0xFFFFFFFF)), np.int64(bitmap >> np.uint64(32))


@njit(cache=True, inline="always")
def subcluster_type(im, slot, idx, sc):
    h, f = entry(im, slot, idx)
    if f & F_COMPRESSED:
        return COMPRESSED
    if im.g[G_EXTENDED]:
        abits, zbits = bitmaps(im, slot, idx)
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
def range_type(im, slot, idx, sc_from):
    """(type of subcluster sc_from, how many subclusters from it share that type) -- qcow2_get_subcluster_range_type."""
    t = subcluster_type(im, slot, idx, sc_from)
    spc = im.g[G_SPC]
    if not im.g[G_EXTENDED] or t == COMPRESSED:
        return t, spc - sc_from
    abits, zbits = bitmaps(im, slot, idx)
    below = (np.int64(1) << sc_from) - 1
    if t == NORMAL:
        return t, trailing_zeros32(~(abits | below)) - sc_from
    if t == ZERO_PLAIN or t == ZERO_ALLOC:
        return t, trailing_zeros32(~(zbits | below)) - sc_from
    return t, trailing_zeros32((abits | zbits) & ~below) - sc_from


@njit(cache=True, inline="always")
def _count_contiguous_subclusters(im, slot, idx, nb_clusters, sc_index):
    count = 0
    expected_type = NORMAL
    expected_host = 0
    check_offset = False
    for i in range(nb_clusters):
        first_sc = sc_index if i == 0 else 0
        t, ret = range_type(im, slot, idx + i, first_sc)
        if i == 0:
            if t == COMPRESSED:
                return ret
            expected_type = t
            expected_host = entry_host(im, slot, idx)
            check_offset = t == NORMAL or t == ZERO_ALLOC or t == UNALLOC_ALLOC
        elif t != expected_type:
            break
        elif check_offset:
            expected_host += 1
            if expected_host != entry_host(im, slot, idx + i):
                break
        count += ret
        if first_sc + ret < im.g[G_SPC]:
            break
    return count


@njit(cache=True)
def host_extent(r, im, record, pos, end):
    """qcow2_get_host_offset in image ``im`` (the run's image, or its backing image): one lookup (none without an
    L2 table; recorded when ``record``) -> (bytes of this extent, its subcluster type, or -1 when no L2 table
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
    if record:
        emit(r, slice_key(g, slot, idx), GET)
    nb = (bytes_needed + (1 << cb) - 1) >> cb
    sc_index = oic >> g[G_SC_BITS]
    count = _count_contiguous_subclusters(im, slot, idx, nb, sc_index)
    avail = (count + sc_index) << g[G_SC_BITS]
    t = subcluster_type(im, slot, idx, sc_index)
    return min(avail, bytes_needed) - oic, t


@njit(cache=True)
def read(r, pos, length):
    """The lookups of qcow2_co_preadv_part: one per extent; unallocated extents read the backing image (queued for
    its own cache model when one is given)."""
    modelled = r.g[G_BACKING_MODELLED]
    end = pos + length
    while pos < end:
        n, t = host_extent(r, r, True, pos, end)
        if modelled and unallocated(t):
            queue_backing(r, pos, n, BACKING_READ)
        pos += n


@njit(cache=True)
def queue_backing(r, pos, n, kind):
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


@njit(cache=True, inline="always")
def unallocated(t):
    """An extent's type that defers to the backing file (no L2 table, or an unallocated (sub)cluster)."""
    return t == -1 or t == UNALLOC_PLAIN or t == UNALLOC_ALLOC


@njit(cache=True)
def detect_metadata_preallocation(r):
    """qcow2_detect_metadata_preallocation, once per open at the first block-status query: qcow2_get_refcount of
    every host cluster from 0 until as many with refcount > 0 as the threshold max(n * 10 / 9, n + 2), or the file's
    end. n is the file's allocated size in clusters (st_blocks): at open, plus what was written since
    (S_WRITTEN_BYTES; this write's own data is written after its zero-checks); the length likewise."""
    r.state[S_SCANNED] = 1
    alloc = r.alloc
    cb = alloc[CLUSTER_BITS]
    allocated = alloc[ALLOCATED_AT_OPEN] + r.state[S_WRITTEN_BYTES]
    n = max(allocated, 0) >> cb
    threshold = max(n * 10 // 9, n + 2)
    end = max(alloc[FILE_CLUSTERS_AT_OPEN], r.state[S_REQUEST_HIGH_WATER])
    r.rst[RS_AT] = r.state[S_EVENTS]
    count = 0
    i = 0
    used = r.used
    while i < end and count < threshold:
        if i < used.shape[0] and used[i] != 0:
            count += 1
        i += 1
    log_lookups(r.covered, alloc, r.rlog, r.rst, 0, i)


@njit(cache=True)
def status(r, pos, length):
    """A block-status query from the image above (bdrv_co_block_status): one extent's lookup; where this image has
    nothing, bdrv_co_common_block_status_above asks the next layer down for what this extent covers. A layer's
    first query scans its refcounts first (qcow2_co_block_status runs the detection once per node)."""
    if not r.state[S_SCANNED]:
        detect_metadata_preallocation(r)
    n, t = host_extent(r, r, True, pos, pos + length)
    if r.g[G_BACKING_MODELLED] and unallocated(t):
        queue_backing(r, pos, n, BACKING_STATUS)


@njit(cache=True)
def zero_below(r, pos, n):
    """How much of [pos, pos+n), unallocated in the run's image, reads as zeroes as bdrv_co_is_zero_fast sees it:
    bdrv_co_common_block_status_above's walk down the chain (without want_zero; read-only, since each layer's
    lookup is its own queued query). Each layer answers for what the layer above left, clamped to its size; the walk
    stops at a layer with zero clusters there (zeroes), with data (0: not zero), at a layer without a backing
    file (zeroes), past a layer's end (zeroes that count as allocated) or at a layer with data everywhere (0: a raw
    file, or a synthetic backing file)."""
    g = r.g
    for k in range(len(r.below) + 1):
        if not g[G_HAS_BACKING_FILE]:
            return n
        size = g[G_BACKING_SIZE]
        if pos >= size:
            return n
        n = min(n, size - pos)
        if not g[G_BACKING_MODELLED] or k == len(r.below):
            return 0
        im = r.below[k]
        n, t = host_extent(r, im, False, pos, pos + n)
        if t == ZERO_PLAIN or t == ZERO_ALLOC:
            return n
        if not unallocated(t):
            return 0
        g = im.g
    return 0
