"""Replay a trace against an image for a list of L2 cache configurations: one row of counters per configuration.

Ties the two stages together: stage 1 (``qsim.engine``, QEMU's code paths) runs once per slice (entry) size, since
that is all the event stream depends on; stage 2 (``qsim.lru``) turns each stream into counters for every cache
size at once. Cache configurations follow QEMU's rules (``qsim.cachecfg``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .cachecfg import DEFAULT_QEMU_VERSION, CacheConfig, CacheSettings, resolve_cache
from .engine import KernelRun, events_nest
from .errors import QsimError, UsageError
from .geometry import ImageGeometry, measure
from .image import ImageState, build_image
from .imageopts import ImageOptions
from .lru import CacheModel
from .trace import Trace, apply_offset_policy
from .units import parse_size

CACHE_MODES = ("writeback", "writethrough")
SHARE_STAGE_1 = True  # derive coarser slice sizes' events from the finest when they nest (tests compare both ways)
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
    return virtual_size_for(trace.max_end_offset)


def virtual_size_for(max_end_offset: int) -> int:
    """A disk holding offsets up to ``max_end_offset``: rounded up to a whole GiB, at least 1 GiB."""
    return max(-(-max_end_offset // GIB), 1) * GIB


@dataclass(frozen=True)
class ReplayResult:
    """Rows of counters (one dict per cache configuration) and the image state after the trace."""

    rows: list[dict]
    image_after: ImageState

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


def replay(
    trace: Trace | Iterable[Trace],
    virtual_size: int | None = None,
    options: ImageOptions = ImageOptions(),
    image: ImageState | None = None,
    l2_cache_sizes: list[int | None] | str | None = None,
    l2_cache_entry_size: int | None = None,
    cache_mode: str = "writeback",
    offset_policy: str = "error",
    qemu_version: str = DEFAULT_QEMU_VERSION,
    progress=None,
    backing: ImageState | None = None,
) -> ReplayResult:
    """Replay ``trace`` against ``image`` (or a synthetic image built from ``options``) for each L2 cache size.

    ``trace`` is a Trace, or an iterable of Trace chunks for a file larger than memory (``qsim.traceio.iter_trace``):
    allocation state and every cache carry across chunks, so the rows equal those of one whole-trace replay, and
    memory stays bounded by the chunk size, the image state and the caches (one small array per L2 slice).
    ``l2_cache_sizes``: list of bytes (None = QEMU's default) or a spec string for parse_cache_sizes. Without
    ``virtual_size`` the disk is a whole trace's largest end offset rounded up to a whole GiB (chunks need it given).
    ``backing`` (the state of the image's backing file) models the backing image's own L2 cache, opened with QEMU's
    default cache options as a backing node is: what is unallocated in the image is read, or queried, there.
    """
    if isinstance(trace, Trace):
        if image is None and virtual_size is None:
            virtual_size = default_virtual_size(trace)
        chunks: Iterable[Trace] = [trace]
    else:
        chunks = trace
    if cache_mode not in CACHE_MODES:
        raise UsageError(f"--cache-mode {cache_mode!r}: expected writeback or writethrough")
    if isinstance(l2_cache_sizes, str) or l2_cache_sizes is None:
        l2_cache_sizes = parse_cache_sizes(l2_cache_sizes)
    if image is None:
        if virtual_size is None:
            raise UsageError("give the virtual size (--size) when the trace streams from a file")
        geometry = ImageGeometry(virtual_size, options.cluster_size, options.extended_l2, options.refcount_bits)
        image = build_image(geometry, options)
    geometry = image.geometry
    configs = [resolve_cache(geometry, CacheSettings(l2_cache_size=s, l2_cache_entry_size=l2_cache_entry_size),
                             qemu_version) for s in l2_cache_sizes]
    groups = []
    for entry_size in sorted({c.l2_cache_entry_size for c in configs}):
        chosen = [k for k, c in enumerate(configs) if c.l2_cache_entry_size == entry_size]
        run = KernelRun(image, entry_size, cache_mode == "writethrough", backing=backing)
        below = None
        if backing is not None:
            backing_cache = resolve_cache(backing.geometry, CacheSettings(), qemu_version)
            backing_run = KernelRun(backing, backing_cache.l2_cache_entry_size)
            below = (backing_run, CacheModel(backing_run.n_keys, [backing_cache.l2_cache_entries]))
        groups.append((run, CacheModel(run.n_keys, [configs[k].l2_cache_entries for k in chosen]), chosen, below))
    source = "<memory>"
    finest = groups[0][0]
    for chunk in chunks:
        source = chunk.source
        chunk = apply_offset_policy(chunk, geometry.virtual_size, offset_policy)
        # When the coarser slice sizes see the finest stream's events with shifted keys, stage 1 runs once. Only
        # while the image is the one given: after writes, each slice size's run keeps its own image state.
        shared = SHARE_STAGE_1 and len(groups) > 1 and backing is None and all(r.work is None for r, *_ in groups) \
            and events_nest(chunk, finest.original, finest.entry_size)
        before = finest.cnt.copy()
        for g, (run, model, _, below) in enumerate(groups):
            if g > 0 and shared:
                run.cnt += finest.cnt - before  # the same requests, reads and bytes; a read-only image is unchanged
                continue
            for events in run.feed(chunk, progress if g == 0 else None):
                model.feed(events.key, events.kind, events.flush_at)
                if g == 0 and shared:
                    for coarse, coarse_model, _, _ in groups[1:]:
                        shift = (coarse.entry_size // finest.entry_size).bit_length() - 1
                        coarse_model.feed(events.key >> shift, events.kind, events.flush_at)
                if below is not None and len(events.backing_offset):
                    for backing_events in below[0].feed(events.backing_trace()):
                        below[1].feed(backing_events.key, backing_events.kind, backing_events.flush_at)
    rows: list[dict | None] = [None] * len(configs)
    for run, model, chosen, below in groups:
        backing_counts = below[1].finish()[0] if below is not None else None
        for k, counts in zip(chosen, model.finish()):
            rows[k] = _row(source, image, run.image, configs[k], run.counters, counts, cache_mode, l2_cache_sizes[k])
            if backing_counts is not None:
                rows[k].update(backing_l2_lookups=backing_counts.lookups, backing_l2_misses=backing_counts.misses,
                               backing_l2_disk_reads=backing_counts.disk_reads,
                               backing_l2_evictions=backing_counts.evictions)
    return ReplayResult([r for r in rows if r is not None], groups[-1][0].image)


def _row(source, image, image_after, config: CacheConfig, counters, counts, cache_mode, asked) -> dict:
    g = image.geometry
    entry = config.l2_cache_entry_size
    return {
        "trace": source,
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
