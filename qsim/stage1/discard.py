"""The discard path, with discard=unmap: bdrv_co_pdiscard's split of a request at cluster boundaries (block/io.c),
qcow2_co_pdiscard's alignment rule, and qcow2_cluster_discard / discard_in_l2_slice (block/qcow2-cluster.c): one
lookup per L2 slice, the new L2 entries, the slice dirtied, the refcounts dropped (update_refcount) and the freed
host clusters handed to the image file as discards (qcow2_process_discards). QEMU 7.2 and 10.0 run the same code;
10.0 adds discard-no-unref (8.1 and later)."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..codes import F_COMPRESSED, F_ZERO, GET, GET_DIRTY
from .entries import entry, entry_bitmap, set_entry, set_entry_bitmap
from .structs import (C_CLUSTERS_DISCARDED, C_CLUSTERS_FREED, C_HOST_DISCARDS, C_HOST_DISCARD_BYTES, G_CLUSTER_BITS,
                      G_DISCARD_NO_UNREF, G_EXTENDED, G_HAS_BACKING_FILE, G_SLICE_BITS, G_TABLE_BITS, G_VIRTUAL_SIZE,
                      S_EVENTS, emit, slice_key)
from .write import free_any_cluster, l2_allocate

# QCOW_L2_BITMAP_ALL_ZEROES: every subcluster reads as zeroes (bits 32-63), none allocated (bits 0-31)
BITMAP_ALL_ZEROES = np.uint64(0xFFFFFFFF) << np.uint64(32)


@njit(cache=True)
def discard(r, offset, length):
    """bdrv_co_pdiscard: the request in pieces at cluster boundaries (qcow2's pdiscard_alignment), a head up to
    the first boundary, the aligned middle, the tail; each piece goes to qcow2_co_pdiscard on its own."""
    cb = r.g[G_CLUSTER_BITS]
    align = np.int64(1) << cb
    head = offset & (align - 1)
    tail = (offset + length) & (align - 1)
    pos = offset
    remaining = length
    while remaining > 0:
        num = remaining
        if head:
            num = min(remaining, align - head)
            head = (head + num) & (align - 1)
        elif tail and num > align:
            num -= tail  # the aligned part; the tail comes next
        _qcow2_pdiscard(r, pos, num)
        pos += num
        remaining -= num


@njit(cache=True)
def _qcow2_pdiscard(r, offset, nbytes):
    """qcow2_co_pdiscard: partial clusters are ignored (-ENOTSUP), except the whole partial last cluster of a disk
    that is not a whole number of clusters."""
    g = r.g
    mask = (np.int64(1) << g[G_CLUSTER_BITS]) - 1
    if (offset | nbytes) & mask:
        if offset & mask or offset + nbytes != g[G_VIRTUAL_SIZE]:
            return
    _cluster_discard(r, offset, nbytes)


@njit(cache=True)
def _cluster_discard(r, offset, nbytes):
    """qcow2_cluster_discard: one discard_in_l2_slice per slice; the host clusters freed on the way are passed to
    the image file at the end (cache_discards), merged into runs of adjacent clusters (update_refcount_discard)."""
    cb = r.g[G_CLUSTER_BITS]
    nb = (nbytes + (np.int64(1) << cb) - 1) >> cb
    freed = 0
    while nb > 0:
        cleared, freed = _discard_in_l2_slice(r, offset, nb, freed)
        nb -= cleared
        offset += cleared << cb
    if freed:
        hosts = np.sort(r.part_first[:freed])
        runs = 1
        for k in range(1, freed):
            if hosts[k] != hosts[k - 1] + 1:
                runs += 1
        r.cnt[C_HOST_DISCARDS] += runs
        r.cnt[C_HOST_DISCARD_BYTES] += freed << cb
        r.cnt[C_CLUSTERS_FREED] += freed


@njit(cache=True)
def _discard_in_l2_slice(r, offset, nb_clusters, freed):
    """discard_in_l2_slice (full_discard false): the slice's lookup (get_cluster_table, which allocates the L2
    table when there is none), then each entry: zero flag (or, with extended_l2, no host cluster and every
    subcluster zero) where the cluster is allocated or a backing file lies below; the slice is dirtied if any
    entry changed; refcounts drop. discard-no-unref keeps the host cluster and its reference (the entry only
    reads as zeroes) and passes each cluster's discard straight to the image file.
    Returns (clusters handled, host clusters freed so far, kept in r.part_first)."""
    g = r.g
    cb = g[G_CLUSTER_BITS]
    cs = np.int64(1) << cb
    gc = offset >> cb
    l1 = gc >> g[G_TABLE_BITS]
    slot = r.tslot[l1]
    if slot < 0:
        slot = l2_allocate(r, l1)
    idx = gc & ((np.int64(1) << g[G_TABLE_BITS]) - 1)
    slice_entries = np.int64(1) << g[G_SLICE_BITS]
    n = min(nb_clusters, slice_entries - (idx & (slice_entries - 1)))
    lookup = r.state[S_EVENTS]
    emit(r, slice_key(g, slot, idx), GET)  # becomes GET_DIRTY below when an entry changes
    extended = g[G_EXTENDED]
    backing = g[G_HAS_BACKING_FILE]
    no_unref = g[G_DISCARD_NO_UNREF]
    changed = 0
    for i in range(n):
        j = idx + i
        h, f = entry(r, slot, j)
        bits = entry_bitmap(r, slot, j) if extended else np.uint64(0)
        compressed = (f & F_COMPRESSED) != 0
        allocated = compressed or h != 0
        keep = no_unref and not compressed
        new_h, new_f, new_bits = h, f, bits
        if backing or allocated:
            if extended:
                if not keep:
                    new_h, new_f = 0, 0
                new_bits = BITMAP_ALL_ZEROES
            elif keep:
                new_f = f | F_ZERO
            else:
                new_h, new_f = 0, F_ZERO
        if new_h == h and new_f == f and new_bits == bits:
            continue
        changed += 1
        set_entry(r, slot, j, new_h, new_f)
        if extended:
            set_entry_bitmap(r, slot, j, new_bits)
        if not keep:
            if allocated and free_any_cluster(r, h, f):
                r.part_first[freed] = h
                freed += 1
        elif h != 0:  # kept: normal or zero-allocated, discarded in the image file cluster by cluster
            r.cnt[C_HOST_DISCARDS] += 1
            r.cnt[C_HOST_DISCARD_BYTES] += cs
    if changed:
        r.cnt[C_CLUSTERS_DISCARDED] += changed
        if r.okind.shape[0] > 0:
            r.okind[lookup] = GET_DIRTY
    return n, freed
