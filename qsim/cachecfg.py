"""QEMU's qcow2 cache options -> the caches QEMU really builds (block/qcow2.c read_cache_sizes).

Given an image geometry and the user's ``l2-cache-size``, ``l2-cache-entry-size``, ``cache-size`` and
``refcount-cache-size`` (any of them unset), return the L2 cache bytes, entry (slice) size and entry count, and the
refcount cache, exactly as the QEMU version in question would: the cap at the whole-disk size, the 32 MiB default,
4 KiB slices when the cache does not cover the disk, the 2-entry and 4-cluster minimums, and QEMU's errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import QsimError
from .geometry import ImageGeometry
from .units import format_size, is_power_of_two

MIN_L2_CACHE_ENTRIES = 2  # MIN_L2_CACHE_SIZE, in entries
MIN_REFCOUNT_CACHE_ENTRIES = 4  # MIN_REFCOUNT_CACHE_SIZE, in clusters
INT_MAX = 2**31 - 1
DEFAULT_QEMU_VERSION = "7.2"


@dataclass(frozen=True)
class QemuVersion:
    """A QEMU release as (major, minor), with the cache defaults that changed over time."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> QemuVersion:
        try:
            parts = [int(p) for p in str(text).strip().split(".")[:2]]
            major, minor = parts[0], parts[1] if len(parts) > 1 else 0
        except (ValueError, IndexError):
            raise QsimError(f"--qemu-version: {text!r} is not a QEMU version (expected e.g. 7.2 or 2.11)", 2) from None
        if major < 2 or major > 99:
            raise QsimError(f"--qemu-version: {text!r} is outside what qsim models (2.0 and later)", 2)
        return cls(major, minor)

    def __ge__(self, other: tuple[int, int]) -> bool:  # type: ignore[override]
        return (self.major, self.minor) >= other

    def __lt__(self, other: tuple[int, int]) -> bool:  # type: ignore[override]
        return (self.major, self.minor) < other

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    # Defaults that changed between releases.
    @property
    def has_entry_size_option(self) -> bool:
        """l2-cache-entry-size and L2 slices exist from 2.12."""
        return self >= (2, 12)

    @property
    def default_l2_is_whole_disk(self) -> bool:
        """From 3.1 the default L2 cache covers the image, up to a 32 MiB cap (Linux); before, 1 MiB."""
        return self >= (3, 1)

    @property
    def small_slices_when_partial(self) -> bool:
        """From 4.0 a cache that cannot cover the disk defaults to 4 KiB slices."""
        return self >= (4, 0)

    @property
    def supports_extended_l2(self) -> bool:
        return self >= (5, 2)


@dataclass(frozen=True)
class CacheSettings:
    """What the user asked for; None means the option was not given."""

    l2_cache_size: int | None = None
    l2_cache_entry_size: int | None = None
    cache_size: int | None = None
    refcount_cache_size: int | None = None


@dataclass(frozen=True)
class CacheConfig:
    """The caches QEMU builds: bytes as QEMU computed them, entry size in bytes, entry counts after the minimums."""

    geometry: ImageGeometry
    l2_cache_bytes: int
    l2_cache_entry_size: int
    l2_cache_entries: int
    refcount_cache_bytes: int
    refcount_cache_entries: int

    @property
    def l2_cache_ram_bytes(self) -> int:
        """RAM the L2 cache really holds (entries x entry size; differs from l2_cache_bytes at the minimum)."""
        return self.l2_cache_entries * self.l2_cache_entry_size

    @property
    def covered_bytes(self) -> int:
        """Guest bytes whose L2 entries fit in the cache at once (capped at the virtual size)."""
        g = self.geometry
        entries_held = self.l2_cache_ram_bytes // g.l2_entry_bytes
        return min(g.virtual_size, entries_held * g.cluster_size)

    @property
    def covered_fraction(self) -> float:
        return 1.0 if self.geometry.virtual_size == 0 else self.covered_bytes / self.geometry.virtual_size

    @property
    def covers_disk(self) -> bool:
        return self.covered_bytes >= self.geometry.virtual_size


def resolve_cache(
    geometry: ImageGeometry,
    settings: CacheSettings = CacheSettings(),
    qemu_version: str | QemuVersion = DEFAULT_QEMU_VERSION,
    linux: bool = True,
) -> CacheConfig:
    """The L2 and refcount caches QEMU opens this image with, or QsimError with QEMU's own complaint."""
    v = qemu_version if isinstance(qemu_version, QemuVersion) else QemuVersion.parse(qemu_version)
    if geometry.extended_l2 and not v.supports_extended_l2:
        raise QsimError(f"extended_l2=on needs QEMU 5.2 or later (asked for {v})")
    if settings.l2_cache_entry_size is not None and not v.has_entry_size_option:
        raise QsimError(f"l2-cache-entry-size does not exist before QEMU 2.12 (asked for {v})")
    if v.default_l2_is_whole_disk:
        l2_bytes, entry_size, refcount_bytes = _read_cache_sizes(geometry, settings, v, linux)
    else:
        l2_bytes, entry_size, refcount_bytes = _read_cache_sizes_before_3_1(geometry, settings, v)
    return _to_entries(geometry, l2_bytes, entry_size, refcount_bytes)


def _read_cache_sizes(g: ImageGeometry, s: CacheSettings, v: QemuVersion, linux: bool) -> tuple[int, int, int]:
    """read_cache_sizes of QEMU 3.1 and later."""
    c = g.cluster_size
    min_refcount_cache = MIN_REFCOUNT_CACHE_ENTRIES * c
    max_l2_cache = g.full_l2_cache_bytes
    default_l2_max = (32 if linux else 8) * 1024 * 1024
    l2_max_setting = s.l2_cache_size if s.l2_cache_size is not None else default_l2_max
    refcount = s.refcount_cache_size or 0
    entry_size = s.l2_cache_entry_size if s.l2_cache_entry_size is not None else c
    l2 = min(max_l2_cache, l2_max_setting)

    if s.cache_size is not None:
        combined = s.cache_size
        _check_combined(s, l2_max_setting, refcount, combined)
        if s.l2_cache_size is not None:
            refcount = combined - l2
        elif s.refcount_cache_size is not None:
            l2 = combined - refcount
        elif combined >= max_l2_cache + min_refcount_cache:
            l2 = max_l2_cache
            refcount = combined - l2
        else:
            refcount = min(combined, min_refcount_cache)
            l2 = combined - refcount

    if v.small_slices_when_partial and l2 < max_l2_cache and s.l2_cache_entry_size is None:
        entry_size = min(c, 4096)
    _check_entry_size(entry_size, c)
    return l2, entry_size, refcount


def _read_cache_sizes_before_3_1(g: ImageGeometry, s: CacheSettings, v: QemuVersion) -> tuple[int, int, int]:
    """read_cache_sizes of QEMU 2.x-3.0: a 1 MiB (or 8-cluster) L2 default, no cap at the image size."""
    c = g.cluster_size
    ratio = 4  # DEFAULT_L2_REFCOUNT_SIZE_RATIO
    default_l2 = max(1024 * 1024, 8 * c)
    min_refcount_cache = MIN_REFCOUNT_CACHE_ENTRIES * c
    l2 = s.l2_cache_size or 0
    refcount = s.refcount_cache_size or 0
    entry_size = s.l2_cache_entry_size if s.l2_cache_entry_size is not None else c
    l2_set, refcount_set = s.l2_cache_size is not None, s.refcount_cache_size is not None
    if s.cache_size is not None:
        combined = s.cache_size
        _check_combined(s, l2, refcount, combined)
        if l2_set:
            refcount = combined - l2
        elif refcount_set:
            l2 = combined - refcount
        elif v >= (2, 12):
            max_l2_cache = g.virtual_size // (c // 8)
            if combined >= max_l2_cache + min_refcount_cache:
                l2, refcount = max_l2_cache, combined - max_l2_cache
            else:
                refcount = min(combined, min_refcount_cache)
                l2 = combined - refcount
        else:
            refcount = combined // (ratio + 1)
            l2 = combined - refcount
    elif v >= (2, 12):
        l2 = l2 if l2_set else default_l2
        refcount = refcount if refcount_set else min_refcount_cache
    elif not l2_set and not refcount_set:
        l2, refcount = default_l2, default_l2 // ratio
    elif not l2_set:
        l2 = refcount * ratio
    elif not refcount_set:
        refcount = l2 // ratio
    _check_entry_size(entry_size, c)
    return l2, entry_size, refcount


def _check_combined(s: CacheSettings, l2_setting: int, refcount: int, combined: int) -> None:
    if s.l2_cache_size is not None and s.refcount_cache_size is not None:
        raise QsimError("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
    if s.l2_cache_size is not None and l2_setting > combined:
        raise QsimError("l2-cache-size may not exceed cache-size")
    if refcount > combined:
        raise QsimError("refcount-cache-size may not exceed cache-size")


def _check_entry_size(entry_size: int, cluster_size: int) -> None:
    if entry_size < 512 or entry_size > cluster_size or not is_power_of_two(entry_size):
        raise QsimError(
            f"l2-cache-entry-size={format_size(entry_size)}: L2 cache entry size must be a power of two between 512 "
            f"and the cluster size ({cluster_size})"
        )


def _to_entries(g: ImageGeometry, l2_bytes: int, entry_size: int, refcount_bytes: int) -> CacheConfig:
    """qcow2_update_options_prepare: bytes -> entries, with the minimums and the INT_MAX limits."""
    l2_entries = max(l2_bytes // entry_size, MIN_L2_CACHE_ENTRIES)
    if l2_entries > INT_MAX:
        raise QsimError("L2 cache size too big")
    refcount_entries = max(refcount_bytes // g.cluster_size, MIN_REFCOUNT_CACHE_ENTRIES)
    if refcount_entries > INT_MAX:
        raise QsimError("Refcount cache size too big")
    return CacheConfig(
        geometry=g,
        l2_cache_bytes=l2_bytes,
        l2_cache_entry_size=entry_size,
        l2_cache_entries=l2_entries,
        refcount_cache_bytes=refcount_entries * g.cluster_size,
        refcount_cache_entries=refcount_entries,
    )


def cache_for_coverage(geometry: ImageGeometry, fraction: float) -> int:
    """Smallest l2-cache-size (bytes) whose cache covers ``fraction`` of the disk under QEMU's rules."""
    g = geometry
    target = min(g.virtual_size, math.ceil(fraction * g.virtual_size))
    need_entries = -(-target // g.cluster_size)
    slice_size = min(g.cluster_size, 4096)
    candidate = max(-(-need_entries * g.l2_entry_bytes // slice_size) * slice_size, 0)
    if candidate >= g.full_l2_cache_bytes:
        return g.full_l2_cache_bytes
    return candidate


def largest_covered_disk(l2_cache_size: int, cluster_size: int, extended_l2: bool) -> int:
    """Largest virtual size (whole clusters) whose L2 tables all fit in ``l2_cache_size`` bytes, QEMU's rules."""
    lo, hi = 0, 1 << 62
    while hi - lo > 1:
        mid = (lo + hi) // 2
        virtual = mid * cluster_size
        g = ImageGeometry(virtual, cluster_size, extended_l2)
        try:
            ok = resolve_cache(g, CacheSettings(l2_cache_size=l2_cache_size)).covers_disk
        except QsimError:
            ok = False
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo * cluster_size
