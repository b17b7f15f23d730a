"""Compiled scans over a real image's L2 entries, for images whose tables hold millions of them: the check's hot
loops (one pass over a batch of plain entries for qemu-img check's calculate_refcounts and check_oflag_copied,
one over the file's clusters for compare_refcounts) and the decode into qsim's entry arrays. ``qsim.qcow2`` uses
the check's for images whose reference counts fit one dense array, ``qsim.image`` the decode; anything unusual
goes back to the numpy path, which handles it or names the problem exactly as before.

Counts are uint8 per host cluster, saturating: a pass stops at a count that would reach 255 (the numpy path keeps
those exactly). Stored refcounts come clipped to 255 (uint8): 1 is exactly 1, and a stored 255 is never below a
count under 255.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .codes import F_COPIED, F_ZERO

OFFSET_MASK = np.uint64(0x00FFFFFFFFFFFE00)
COPIED = np.uint64(1) << np.uint64(63)
COMPRESSED = np.uint64(1) << np.uint64(62)
ALMOST_SATURATED = 254


@njit(cache=True, nogil=True)
def count_plain_refs(d, allowed, cluster_bits, file_bytes, stored, counts, active):
    """Count the data clusters of descriptors ``d`` (uint64; no compressed entry, no external data file) into
    ``counts``; with ``active``, each one's COPIED flag must agree with a stored refcount of 1. Returns -1, or the
    first entry that needs the exact path (a bit outside ``allowed``, a cluster past ``file_bytes``, a COPIED
    mismatch, a count about to saturate), with the counts of the entries before it taken back."""
    bad = -1
    for i in range(d.shape[0]):
        e = d[i]
        if e & ~allowed:
            bad = i
            break
        host = e & OFFSET_MASK
        if host == 0:
            continue
        if host >= file_bytes:
            bad = i
            break
        c = host >> cluster_bits
        if active and (stored[c] == 1) != ((e & COPIED) != 0):
            bad = i
            break
        n = counts[c]
        if n >= ALMOST_SATURATED:
            bad = i
            break
        counts[c] = n + 1
    if bad >= 0:
        for i in range(bad):
            host = d[i] & OFFSET_MASK
            if host != 0:
                counts[host >> cluster_bits] -= 1
    return bad


def suspects(counts: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Host clusters, ascending, referenced more often than their stored refcount says (or 255 times or more: their
    exact count is elsewhere): the only ones compare_refcounts has to look at closely."""
    out = np.empty(counts.shape[0], np.int64)  # (pages only where suspects are written: almost none)
    return out[: _suspects(counts, stored, out)]


@njit(cache=True, nogil=True)
def _suspects(counts, stored, out):
    n = 0
    for c in range(counts.shape[0]):
        made = counts[c]
        if made != 0 and (made == 255 or c >= stored.shape[0] or stored[c] < made):
            out[n] = c
            n += 1
    return n


def decode_plain_entries(d: np.ndarray, cluster_bits: int, file_clusters: int, extended: bool):
    """(host cluster int64, codes.F_* flags uint8) of L2 descriptors ``d`` (any shape) of an image without an
    external data file, in one pass; None when an entry is compressed or points past the file's end (the numpy
    path in qsim.image decodes those, or names the problem)."""
    host = np.empty(d.shape, np.int64)
    flags = np.empty(d.shape, np.uint8)
    if not _decode_plain(d.reshape(-1), cluster_bits, file_clusters, extended, host.reshape(-1), flags.reshape(-1)):
        return None
    return host, flags


@njit(cache=True, nogil=True)
def _decode_plain(d, cluster_bits, file_clusters, extended, host, flags):
    for i in range(d.shape[0]):
        e = d[i]
        if e & COMPRESSED:
            return False
        h = np.int64((e & OFFSET_MASK) >> np.uint64(cluster_bits))
        if h >= file_clusters:
            return False
        host[i] = h
        f = np.uint8(F_COPIED) if e & COPIED else np.uint8(0)
        if not extended and e & np.uint64(1):  # QCOW_OFLAG_ZERO
            f |= np.uint8(F_ZERO)
        flags[i] = f
    return True
