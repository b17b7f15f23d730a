"""``qsim size``: the L2 cache a disk needs, the cache QEMU will build, and settings ready to paste."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .cachecfg import (
    DEFAULT_QEMU_VERSION,
    MIN_REFCOUNT_CACHE_ENTRIES,
    CacheConfig,
    CacheSettings,
    cache_for_coverage,
    resolve_cache,
)
from .geometry import ImageGeometry
from .units import format_size


@dataclass(frozen=True)
class PasteableSettings:
    """The same L2 cache spelled for QEMU's -drive, -blockdev and libvirt's domain XML."""

    l2_cache_size: int
    drive: str
    blockdev: str
    libvirt: str


def pasteable_settings(geometry: ImageGeometry, l2_cache_size: int, refcount_cache_size: int | None = None,
                       l2_cache_entry_size: int | None = None, filename: str = "disk.qcow2") -> PasteableSettings:
    """QEMU options and libvirt XML that give an L2 cache of ``l2_cache_size`` bytes.

    libvirt (>= 7.0) has one knob, ``<metadata_cache><max_size>``, which it passes as QEMU's combined ``cache-size``;
    QEMU gives the L2 cache all of it up to the whole-disk size once the refcount cache has its 4-cluster minimum, so
    the libvirt value is the L2 size plus that minimum (or the refcount size asked for).
    """
    refcount = refcount_cache_size
    if refcount is None:
        refcount = MIN_REFCOUNT_CACHE_ENTRIES * geometry.cluster_size
    drive_opts = [f"file={filename}", "format=qcow2", f"l2-cache-size={format_size(l2_cache_size)}"]
    blockdev: dict[str, object] = {
        "driver": "qcow2",
        "node-name": "disk0",
        "file": {"driver": "file", "filename": filename},
        "l2-cache-size": l2_cache_size,
    }
    if l2_cache_entry_size is not None:
        drive_opts.append(f"l2-cache-entry-size={format_size(l2_cache_entry_size)}")
        blockdev["l2-cache-entry-size"] = l2_cache_entry_size
    if refcount_cache_size is not None:
        drive_opts.append(f"refcount-cache-size={format_size(refcount_cache_size)}")
        blockdev["refcount-cache-size"] = refcount_cache_size
    combined = l2_cache_size + refcount
    libvirt = (
        "<driver name='qemu' type='qcow2'><metadata_cache>"
        f"<max_size unit='bytes'>{combined}</max_size></metadata_cache></driver>"
    )
    return PasteableSettings(
        l2_cache_size=l2_cache_size,
        drive="-drive " + ",".join(drive_opts),
        blockdev="-blockdev '" + json.dumps(blockdev, separators=(",", ":")) + "'",
        libvirt=libvirt,
    )


@dataclass(frozen=True)
class SizeReport:
    """Everything ``qsim size`` answers, in bytes."""

    geometry: ImageGeometry
    qemu_version: str
    configured: CacheConfig  # the cache QEMU builds for the options given (or its defaults)
    default: CacheConfig  # the cache QEMU builds with no cache options at all
    target_l2_cache_bytes: int  # what the settings below ask for
    target_reason: str
    settings: PasteableSettings

    def to_dict(self) -> dict[str, object]:
        g, c = self.geometry, self.configured
        return {
            "virtual_size": g.virtual_size,
            "cluster_size": g.cluster_size,
            "extended_l2": g.extended_l2,
            "refcount_bits": g.refcount_bits,
            "qemu_version": self.qemu_version,
            "l2_entry_bytes": g.l2_entry_bytes,
            "l2_tables": g.l2_tables,
            "full_l2_cache_bytes": g.full_l2_cache_bytes,
            "l2_cache_bytes": c.l2_cache_bytes,
            "l2_cache_entry_size": c.l2_cache_entry_size,
            "l2_cache_entries": c.l2_cache_entries,
            "l2_cache_ram_bytes": c.l2_cache_ram_bytes,
            "refcount_cache_bytes": c.refcount_cache_bytes,
            "refcount_cache_entries": c.refcount_cache_entries,
            "covered_bytes": c.covered_bytes,
            "covered_fraction": c.covered_fraction,
            "default_l2_cache_bytes": self.default.l2_cache_bytes,
            "default_l2_cache_entry_size": self.default.l2_cache_entry_size,
            "default_l2_cache_entries": self.default.l2_cache_entries,
            "default_covered_bytes": self.default.covered_bytes,
            "default_covered_fraction": self.default.covered_fraction,
            "target_l2_cache_bytes": self.target_l2_cache_bytes,
            "target_reason": self.target_reason,
            "settings": {"drive": self.settings.drive, "blockdev": self.settings.blockdev,
                         "libvirt": self.settings.libvirt},
        }


def size_report(
    geometry: ImageGeometry,
    settings: CacheSettings = CacheSettings(),
    qemu_version: str = DEFAULT_QEMU_VERSION,
    coverage: float | None = None,
) -> SizeReport:
    """Size the caches of ``geometry``: what QEMU builds for ``settings``, and the settings that meet the target.

    The target is the given l2-cache-size if any, else the cache covering ``coverage`` of the disk (default: all).
    """
    configured = resolve_cache(geometry, settings, qemu_version)
    default = resolve_cache(geometry, CacheSettings(), qemu_version)
    if coverage is not None:
        target = cache_for_coverage(geometry, coverage)
        reason = f"covers {coverage:.4g} of the disk"
    elif settings.l2_cache_size is not None:
        target = settings.l2_cache_size
        reason = "as asked"
    else:
        target = geometry.full_l2_cache_bytes
        reason = "covers the whole disk"
    paste = pasteable_settings(geometry, target, settings.refcount_cache_size, settings.l2_cache_entry_size)
    return SizeReport(geometry, str(qemu_version), configured, default, target, reason, paste)


def coverage_table(virtual_sizes: list[int], cluster_sizes: list[int], extended_l2: list[bool] = (False, True),
                   qemu_version: str = DEFAULT_QEMU_VERSION):
    """Disk size x cluster size x extended_l2 -> whole-disk L2 bytes and what QEMU's default covers (a DataFrame).
    Combinations QEMU refuses are left out."""
    import pandas as pd

    from .errors import QsimError

    rows = []
    for ext in extended_l2:
        for cluster in cluster_sizes:
            for size in virtual_sizes:
                try:
                    g = ImageGeometry(size, cluster, ext)
                    g.check_l1_size()
                    default = resolve_cache(g, CacheSettings(), qemu_version)
                except QsimError:
                    continue
                rows.append({"virtual_size": size, "cluster_size": cluster, "extended_l2": ext,
                             "full_l2_cache_bytes": g.full_l2_cache_bytes,
                             "default_l2_cache_bytes": default.l2_cache_bytes,
                             "default_covered_fraction": default.covered_fraction})
    return pd.DataFrame(rows)
