"""L2 entry access: the only code that reads or writes an image's L2 entries (host cluster, flags, extended-L2
bitmap) by table slot and index, so the kernels do not depend on how the entries are stored.

``im`` is an L2View or a Run (qsim.stage1.structs). Every accessor is inlined into its caller.
"""

from __future__ import annotations

from numba import njit


@njit(cache=True, inline="always")
def entry_host(im, slot, idx):
    """Host cluster index of entry ``idx`` of the table in ``slot`` (0: none)."""
    return im.ehost[slot, idx]


@njit(cache=True, inline="always")
def entry_flags(im, slot, idx):
    """codes.F_* flags of the entry."""
    return im.eflags[slot, idx]


@njit(cache=True, inline="always")
def entry(im, slot, idx):
    """(host cluster, flags) of the entry in one look-up."""
    return im.ehost[slot, idx], im.eflags[slot, idx]


@njit(cache=True, inline="always")
def entry_bitmap(im, slot, idx):
    """The extended-L2 subcluster bitmap (uint64, QEMU's layout); only with extended_l2."""
    return im.ebits[slot, idx]


@njit(cache=True, inline="always")
def set_entry(im, slot, idx, host, flags):
    """Write the entry's host cluster and flags."""
    im.ehost[slot, idx] = host
    im.eflags[slot, idx] = flags


@njit(cache=True, inline="always")
def set_entry_bitmap(im, slot, idx, bitmap):
    """Write the entry's extended-L2 bitmap."""
    im.ebits[slot, idx] = bitmap
