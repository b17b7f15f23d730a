"""Replay a trace against an image for a list of L2 cache configurations: one row of counters per configuration.

Ties the two stages together: stage 1 (``qsim.engine``, QEMU's code paths) runs once per slice (entry) size, since
that is all the event stream depends on; stage 2 (``qsim.lru``) turns each stream into counters for every cache
size at once. Cache configurations follow QEMU's rules (``qsim.cachecfg``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .cachecfg import DEFAULT_QEMU_VERSION, CacheConfig, CacheSettings, resolve_cache
from .engine import run_kernel
from .errors import QsimError, UsageError
from .geometry import ImageGeometry, measure
from .image import ImageState, build_image
from .imageopts import ImageOptions
from .lru import counts_for_sizes
from .trace import Trace, apply_offset_policy
from .units import parse_size

CACHE_MODES = ("writeback", "writethrough")
GIB = 1 << 30


def parse_cache_sizes(text: str | None) -> list[int | None]:
    """``"64k,256k,1M,default"`` or ``"64k..64M"`` (powers of two) or ``"64k..64M:20"`` (20 log-spaced sizes,
    rounded to 512 bytes). None stands for QEMU's default."""
    if text is None or not str(text).strip():
        return [None]
    sizes: list[int | None] = []
    for item in str(text).split(","):
        item = item.strip()
        if item.lower() == "default":
            sizes.append(None)
        elif ".." in item:
            low, _, rest = item.partition("..")
            high, _, count = rest.partition(":")
            lo, hi = parse_size(low, "--l2-cache-size"), parse_size(high, "--l2-cache-size")
            if lo <= 0 or hi < lo:
                raise UsageError(f"--l2-cache-size {item}: a range goes from a positive size up, e.g. 64k..64M")
            if count:
                try:
                    n = int(count)
                except ValueError:
                    raise UsageError(f"--l2-cache-size {item}: the count after ':' must be a whole number") from None
                if n < 2:
                    raise UsageError(f"--l2-cache-size {item}: a range needs at least 2 points")
                points = np.geomspace(lo, hi, n)
                sizes.extend(sorted({max(512, int(round(p / 512)) * 512) for p in points}))
            else:
                size = lo
                while size <= hi:
                    sizes.append(size)
                    size *= 2
                if sizes[-1] != hi:
                    sizes.append(hi)
        else:
            sizes.append(parse_size(item, "--l2-cache-size"))
    return sizes


def default_virtual_size(trace: Trace) -> int:
    """The trace's largest end offset rounded up to a whole GiB (at least 1 GiB)."""
    return max(math.ceil(trace.max_end_offset / GIB), 1) * GIB


@dataclass(frozen=True)
class ReplayResult:
    """Rows of counters (one dict per cache configuration) and the image state after the trace."""

    rows: list[dict]
    image_after: ImageState

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


def replay(
    trace: Trace,
    virtual_size: int | None = None,
    options: ImageOptions = ImageOptions(),
    image: ImageState | None = None,
    l2_cache_sizes: list[int | None] | str | None = None,
    l2_cache_entry_size: int | None = None,
    cache_mode: str = "writeback",
    offset_policy: str = "error",
    qemu_version: str = DEFAULT_QEMU_VERSION,
    progress=None,
) -> ReplayResult:
    """Replay ``trace`` against ``image`` (or a synthetic image built from ``options``) for each L2 cache size.

    ``l2_cache_sizes``: list of bytes (None = QEMU's default) or a spec string for parse_cache_sizes.
    """
    if cache_mode not in CACHE_MODES:
        raise UsageError(f"--cache-mode {cache_mode!r}: expected writeback or writethrough")
    if isinstance(l2_cache_sizes, str) or l2_cache_sizes is None:
        l2_cache_sizes = parse_cache_sizes(l2_cache_sizes)
    if image is None:
        size = virtual_size if virtual_size is not None else default_virtual_size(trace)
        geometry = ImageGeometry(size, options.cluster_size, options.extended_l2, options.refcount_bits)
        image = build_image(geometry, options)
    geometry = image.geometry
    trace = apply_offset_policy(trace, geometry.virtual_size, offset_policy)
    configs = [resolve_cache(geometry, CacheSettings(l2_cache_size=s, l2_cache_entry_size=l2_cache_entry_size),
                             qemu_version) for s in l2_cache_sizes]
    rows: list[dict | None] = [None] * len(configs)
    image_after = image
    for entry_size in sorted({c.l2_cache_entry_size for c in configs}):
        result = run_kernel(image, trace, entry_size, cache_mode == "writethrough", progress=progress)
        image_after = result.image
        stream = result.events
        chosen = [k for k, config in enumerate(configs) if config.l2_cache_entry_size == entry_size]
        all_counts = counts_for_sizes(stream.key, stream.kind, stream.flush_at, stream.n_keys,
                                      [configs[k].l2_cache_entries for k in chosen])
        for k, counts in zip(chosen, all_counts):
            rows[k] = _row(trace, image, image_after, configs[k], stream.counters, counts, cache_mode,
                           l2_cache_sizes[k])
    return ReplayResult([r for r in rows if r is not None], image_after)


def _row(trace, image, image_after, config: CacheConfig, counters, counts, cache_mode, asked) -> dict:
    g = image.geometry
    entry = config.l2_cache_entry_size
    return {
        "trace": trace.source,
        "virtual_size": g.virtual_size,
        "cluster_size": g.cluster_size,
        "extended_l2": g.extended_l2,
        "preallocation": image.description,
        "backing": image.backing,
        "cache_mode": cache_mode,
        "l2_cache_size_asked": "default" if asked is None else int(asked),
        "l2_cache_bytes": config.l2_cache_bytes,
        "l2_cache_entry_size": entry,
        "l2_cache_entries": config.l2_cache_entries,
        "l2_cache_ram_bytes": config.l2_cache_ram_bytes,
        "covered_fraction": config.covered_fraction,
        "requests": counters["requests"],
        "l2_lookups": counts.lookups,
        "l2_hits": counts.hits,
        "l2_misses": counts.misses,
        "l2_disk_reads": counts.disk_reads,
        "l2_evictions": counts.evictions,
        "l2_writebacks": counts.writebacks,
        "l2_writebacks_at_close": counts.writebacks_at_close,
        "l2_hit_ratio": counts.hits / counts.lookups if counts.lookups else 1.0,
        "metadata_read_bytes": counts.disk_reads * entry,
        "metadata_write_bytes": counts.writebacks * entry,
        "cow_read_bytes": counters["cow_read_bytes"],
        "cow_write_bytes": counters["cow_write_bytes"],
        "zero_fill_bytes": counters["zero_fill_bytes"],
        "guest_read_bytes": counters["guest_read_bytes"],
        "guest_write_bytes": counters["guest_write_bytes"],
        "l2_tables_allocated": counters["l2_tables_allocated"],
        "clusters_allocated": counters["clusters_allocated"],
        "image_file_bytes": image_after.file_bytes,
        "full_l2_cache_bytes": g.full_l2_cache_bytes,
        "metadata_overhead_bytes": measure(g).required,
        "exact": not counters["unmodelled_refcount_growth"],
    }


__all__ = ["replay", "parse_cache_sizes", "default_virtual_size", "ReplayResult", "QsimError"]
