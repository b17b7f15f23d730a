"""L2 entry access: the only code that reads or writes an image's L2 entries (host cluster, flags, extended-L2
bitmap) by table slot and index, so the kernels do not depend on how the entries are stored.

Entries live in two places (qsim.imagestate.ImageState says why): tables with a slot below the dense part's row
count (``ehost.shape[0]``) have dense rows ``ehost`` / ``eflags`` / ``ebits`` [slot, index]; the others, tables
created during a replay, keep only the entries ever written, in an open-addressing hash with linear probing keyed
by ``slot << table_bits | index``: ``skey`` int64 (-1: empty), ``shost``, ``sflags``, ``sbits`` (extended_l2; else
one placeholder element) and ``sstate`` (SP_COUNT keys, SP_BITS log2 of the capacity, SP_OVERFLOW set when an
insert found the table fuller than the caller promised: reported, never looped on). An absent entry reads as 0.

``im`` is an L2View or a Run (qsim.stage1.structs). Every accessor is inlined into its caller.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .structs import G_TABLE_BITS

SP_COUNT, SP_BITS, SP_OVERFLOW = range(3)
SPARSE_STATE_SIZE = 3
EMPTY_KEY = -1
MAX_LOAD = 0.75  # an insert past this share of the capacity sets SP_OVERFLOW (callers size for at most 0.5)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, inline="always")
def data_file_host(guest_cluster):
    """The host index of a data cluster in an image with an external data file: the data-file cluster (always
    the guest cluster, QEMU's do_alloc_cluster_offset) plus one, since data-file offset 0 is valid data
    (qcow2_get_cluster_type: offset 0 with QCOW_OFLAG_COPIED is a normal cluster) and host index 0 means none.
    Never an index into the image file's host cluster map."""
    return guest_cluster + 1


@njit(cache=True, inline="always")
def _home(key, bits):
    """Fibonacci hashing: the top ``bits`` bits of key x 2^64/phi."""
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(64 - bits))


@njit(cache=True)
def _find(im, slot, idx):
    """Position of the entry's key in the hash, or -1 - (the empty position where it would go). Not inlined: the
    dense path of every accessor stays a branch and a load in the kernels' loops."""
    key = (np.int64(slot) << im.g[G_TABLE_BITS]) | idx
    keys = im.skey
    mask = keys.shape[0] - 1
    p = _home(key, im.sstate[SP_BITS])
    while True:
        k = keys[p]
        if k == key:
            return p
        if k == EMPTY_KEY:
            return -1 - p
        p = (p + 1) & mask


@njit(cache=True)
def _insert(im, slot, idx):
    """Position of the entry, inserted (all zero) when absent."""
    p = _find(im, slot, idx)
    if p >= 0:
        return p
    p = -1 - p
    st = im.sstate
    n = st[SP_COUNT] + 1
    if n >= im.skey.shape[0] * MAX_LOAD:
        st[SP_OVERFLOW] = 1
        if n >= im.skey.shape[0]:  # keep one empty position so that look-ups end
            return -1
    im.skey[p] = (np.int64(slot) << im.g[G_TABLE_BITS]) | idx
    im.shost[p] = 0
    im.sflags[p] = 0
    if im.sbits.shape[0] > 1:
        im.sbits[p] = 0
    st[SP_COUNT] = n
    return p


@njit(cache=True, inline="always")
def entry(im, slot, idx):
    """(host cluster index (0: none), codes.F_* flags) of entry ``idx`` of the table in ``slot``."""
    eh = im.ehost
    if slot < eh.shape[0]:
        return eh[slot, idx], im.eflags[slot, idx]
    p = _find(im, slot, idx)
    if p < 0:
        return np.int64(0), np.uint8(0)
    return im.shost[p], im.sflags[p]


@njit(cache=True, inline="always")
def entry_host(im, slot, idx):
    """Host cluster index of the entry (0: none)."""
    eh = im.ehost
    if slot < eh.shape[0]:
        return eh[slot, idx]
    p = _find(im, slot, idx)
    return im.shost[p] if p >= 0 else np.int64(0)


@njit(cache=True, inline="always")
def entry_flags(im, slot, idx):
    """codes.F_* flags of the entry."""
    ef = im.eflags
    if slot < ef.shape[0]:
        return ef[slot, idx]
    p = _find(im, slot, idx)
    return im.sflags[p] if p >= 0 else np.uint8(0)


@njit(cache=True, inline="always")
def entry_bitmap(im, slot, idx):
    """The extended-L2 subcluster bitmap (uint64, QEMU's layout); only with extended_l2."""
    if slot < im.ehost.shape[0]:  # (the [1, 1] placeholder of ebits never answers: only with extended_l2)
        return im.ebits[slot, idx]
    p = _find(im, slot, idx)
    return im.sbits[p] if p >= 0 else np.uint64(0)


@njit(cache=True, inline="always")
def set_entry(im, slot, idx, host, flags):
    """Write the entry's host cluster and flags (an absent sparse entry stays absent when both are 0)."""
    eh = im.ehost
    if slot < eh.shape[0]:
        eh[slot, idx] = host
        im.eflags[slot, idx] = flags
        return
    if host == 0 and flags == 0:
        p = _find(im, slot, idx)
        if p < 0:
            return
    else:
        p = _insert(im, slot, idx)
        if p < 0:
            return
    im.shost[p] = host
    im.sflags[p] = flags


@njit(cache=True, inline="always")
def set_entry_bitmap(im, slot, idx, bitmap):
    """Write the entry's extended-L2 bitmap."""
    if slot < im.ehost.shape[0]:
        im.ebits[slot, idx] = bitmap
        return
    p = _insert(im, slot, idx) if bitmap != 0 else _find(im, slot, idx)
    if p >= 0:
        im.sbits[p] = bitmap


@njit(cache=True)
def rehash(key, host, flags, bits, new_key, new_host, new_flags, new_bits, new_bits_log2):
    """Move every entry of one hash into a larger empty one (``new_key`` all EMPTY_KEY, capacity 2^new_bits_log2);
    returns the count."""
    mask = new_key.shape[0] - 1
    extended = bits.shape[0] > 1 and new_bits.shape[0] > 1
    n = 0
    for i in range(key.shape[0]):
        k = key[i]
        if k == EMPTY_KEY:
            continue
        p = _home(k, new_bits_log2)
        while new_key[p] != EMPTY_KEY:
            p = (p + 1) & mask
        new_key[p] = k
        new_host[p] = host[i]
        new_flags[p] = flags[i]
        if extended:
            new_bits[p] = bits[i]
        n += 1
    return n
