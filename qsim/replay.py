"""Replay a trace under one scenario: one row of counters per cache configuration.

Ties the two stages together: stage 1 (``qsim.engine``, QEMU's code paths) runs once per slice (entry) size, since
that is all the event stream depends on; stage 2 (``qsim.lru``) turns each stream into counters for every cache
size at once. Cache configurations follow QEMU's rules (``qsim.cachecfg``). Everything a replay depends on but the
trace comes in one ``Scenario`` (``qsim.scenario``); the library takes typed values only (the CLI parses text).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from .cachecfg import CacheConfig, CacheSettings, resolve_cache
from .engine import KernelRun, events_nest
from .errors import QsimError, UsageError
from .geometry import ImageGeometry, measure
from .image import ChainLayer, backing_chain as read_backing_chain, build_image, image_from_qcow2
from .imagestate import ImageState
from .codes import GET, R_FLUSH, R_L2_FLUSH
from .hostalloc import RL_KEY, RL_KIND, RL_REPEAT
from .lru import CacheCounts, CacheModel
from .refcache import CoupledCaches, RefcountCounts
from .scenario import DEFAULT_CACHE_CLEAN_INTERVAL, ImageSpec, Scenario
from .trace import Trace, apply_offset_policy
from .units import format_size

GIB = 1 << 30
PIPELINE_MIN_REQUESTS = 1 << 20  # a trace this long (or streamed) runs stage 1 ahead of stage 2, in a thread
PIPELINE_BUFFER_SETS = 4  # event buffer sets the two stages pass round (a quarter of the events each): stage 1 runs
# up to three chunks ahead, so a short chunk (a trace chunk's last few requests) never stalls it


def default_virtual_size(trace: Trace) -> int:
    """The trace's largest end offset rounded up to a whole GiB (at least 1 GiB)."""
    return virtual_size_for(trace.max_end_offset)


def virtual_size_for(max_end_offset: int) -> int:
    """A disk holding offsets up to ``max_end_offset``: rounded up to a whole GiB, at least 1 GiB."""
    return max(-(-max_end_offset // GIB), 1) * GIB


@dataclass(frozen=True)
class ReplayResult:
    """Rows of counters (one dict per cache configuration, in the scenario's order), the image state after the
    trace, and notes for the user (warnings about a real image)."""

    rows: list[dict]
    image_after: ImageState
    notes: tuple[str, ...] = ()

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        frame.attrs["notes"] = list(self.notes)
        return frame


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """The states a scenario's image spec names: the image, the qcow2 layers of its backing chain (nearest first,
    down to the first raw file, which has data everywhere and no cache), the whole chain as QEMU opens it, and what
    the user should be told."""

    state: ImageState
    below: tuple[ImageState, ...] = ()
    chain: tuple[ChainLayer, ...] = ()
    notes: tuple[str, ...] = ()


def load_image(spec: ImageSpec, trace: Trace | None = None) -> LoadedImage:
    """Build (synthetic) or read (real, read-only) the image of ``spec``, a real one with its whole backing chain.
    A synthetic image without a size takes the whole ``trace``'s end rounded up to a GiB."""
    if spec.is_real:
        from .qcow2 import open_image

        img = open_image(spec.path, keep_tables=True)  # (the check's L2 tables become the state's)
        notes = tuple(f"{spec.path}: {w}" for w in img.warnings)
        chain = read_backing_chain(img)
        below = []
        for layer in chain:
            if layer.state is None:
                break
            below.append(layer.state)
        state = image_from_qcow2(img)
        if chain:
            state = replace(state, backing_size=chain[0].virtual_size)
        return LoadedImage(state, tuple(below), chain, notes)
    size = spec.virtual_size
    if size is None:
        if trace is None:
            raise UsageError("give the virtual size (--size) when the trace streams from a file")
        size = default_virtual_size(trace)
    options = spec.options
    return LoadedImage(build_image(ImageGeometry(size, options.cluster_size, options.extended_l2,
                                                 options.refcount_bits), options))


def backing_configs(below: tuple[ImageState, ...], scenario: Scenario) -> list[CacheConfig]:
    """Each qcow2 layer's own L2 cache below the image: QEMU gives a backing node its defaults (bdrv_backing_options
    passes no cache option down), unless ``backing.l2-cache-size`` and the like set them (``backing_caches``)."""
    settings = scenario.backing_caches + (CacheSettings(),) * max(len(below) - len(scenario.backing_caches), 0)
    return [resolve_cache(state.geometry, settings[k], scenario.qemu_version) for k, state in enumerate(below)]


@dataclass(eq=False)
class _Layer:
    """A qcow2 layer of the backing chain: its own L2 cache, fed what the layer above asks of it (reads of what
    the layer above lacks, block-status queries), and passing on what it lacks itself to the layer below."""

    config: CacheConfig
    run: KernelRun
    model: CacheModel
    refcount: CacheModel  # its refcount cache: a read-only layer's only use of it is the one-time scan
    below: _Layer | None
    refcount_repeats: int = 0  # lookups beyond the first of each log row (hits: the row's block was just used)

    @classmethod
    def open(cls, below: tuple[ImageState, ...], configs: list[CacheConfig], fast_paths: bool) -> _Layer | None:
        if not below:
            return None
        sizes = tuple(zip(below, (c.l2_cache_entry_size for c in configs)))
        run = KernelRun(below[0], configs[0].l2_cache_entry_size, below=sizes[1:], fast_paths=fast_paths)
        return cls(configs[0], run, CacheModel(run.n_keys, [configs[0].l2_cache_entries]),
                   CacheModel(max(len(below[0].refblock_covered), 1), [configs[0].refcount_cache_entries]),
                   cls.open(below[1:], configs[1:], fast_paths))

    def feed(self, asked) -> None:
        for chunk in self.run.feed(asked.backing_trace()):
            self.model.feed(chunk.key, chunk.kind, chunk.flush_at)
            log = chunk.refcount_log
            if len(log):  # the layer's first block-status query scanned its refcounts (lookups only: read-only)
                self.refcount.feed(np.ascontiguousarray(log[:, RL_KEY]), np.full(len(log), GET, np.uint8),
                                   np.zeros(0, np.int64))
                self.refcount_repeats += int(log[:, RL_REPEAT].sum()) - len(log)
            if self.below is not None and len(chunk.backing_offset):
                self.below.feed(chunk)

    def columns(self, depth: int = 1) -> dict:
        """``backing_l2_*`` for the layer right below the image, ``backing2_l2_*`` for the next, and so on."""
        counts = self.model.finish()[0]
        prefix = "backing_" if depth == 1 else f"backing{depth}_"
        out = {prefix + "l2_cache_entries": self.config.l2_cache_entries,
               prefix + "l2_cache_entry_size": self.config.l2_cache_entry_size,
               prefix + "l2_lookups": counts.lookups, prefix + "l2_misses": counts.misses,
               prefix + "l2_disk_reads": counts.disk_reads, prefix + "l2_evictions": counts.evictions}
        rc = self.refcount.finish()[0]
        out |= {prefix + "refcount_lookups": rc.lookups + self.refcount_repeats,
                prefix + "refcount_misses": rc.misses, prefix + "refcount_disk_reads": rc.disk_reads,
                prefix + "refcount_evictions": rc.evictions, prefix + "refcount_writebacks": 0,
                prefix + "refcount_writebacks_at_close": 0}
        return out | (self.below.columns(depth + 1) if self.below is not None else {})


@dataclass(eq=False)
class _SliceGroup:
    """The cache configurations that share one slice (entry) size: one stage-1 run, one stage-2 model, and the
    chain below with its own caches."""

    entry_size: int
    chosen: list[int]  # indices into the scenario's caches
    run: KernelRun
    model: CacheModel
    backing: _Layer | None
    pairs: list[tuple[int, int]] = None  # (L2 entries, refcount entries) of each chosen configuration
    coupled: dict | None = None  # pair -> CoupledCaches, from the first refcount-cache operation on

    def feed_refcount(self, key: np.ndarray, kind: np.ndarray, rlog: np.ndarray) -> None:
        """The coupled caches of every pair, started at the first refcount operation that is not a bare flush (an
        image that was only read until then has a clean L2 cache, seeded from the one-pass model's recency)."""
        if self.coupled is None:
            kinds = rlog[:, RL_KIND]
            if not ((kinds != R_L2_FLUSH) & (kinds != R_FLUSH)).any():
                return
            seed = self.model.recency() if self.model.lookups else None
            self.coupled = {pair: CoupledCaches(*pair, self.run.n_keys, seed_keys=seed) for pair in set(self.pairs)}
        for caches in self.coupled.values():
            caches.feed(key, kind, rlog)

    def refcount_counts(self, k: int) -> RefcountCounts | None:
        return None if self.coupled is None else self.coupled[self.pairs[k]].finish()


def _slice_groups(state: ImageState, below: tuple[ImageState, ...], configs: list[CacheConfig], scenario: Scenario,
                  fast_paths: bool) -> list[_SliceGroup]:
    groups = []
    layer_configs = backing_configs(below, scenario)
    sizes = tuple(zip(below, (c.l2_cache_entry_size for c in layer_configs)))
    for entry_size in sorted({c.l2_cache_entry_size for c in configs}):
        chosen = [k for k, c in enumerate(configs) if c.l2_cache_entry_size == entry_size]
        run = KernelRun(state, entry_size, scenario.cache_mode == "writethrough", below=sizes,
                        fast_paths=fast_paths, discard=scenario.discard, discard_no_unref=scenario.discard_no_unref)
        model = CacheModel(run.n_keys, [configs[k].l2_cache_entries for k in chosen])
        pairs = [(configs[k].l2_cache_entries, configs[k].refcount_cache_entries) for k in chosen]
        groups.append(_SliceGroup(entry_size, chosen, run, model, _Layer.open(below, layer_configs, fast_paths),
                                  pairs))
    return groups


@dataclass(eq=False)
class _CleanTimer:
    """QEMU's cache-clean timers on the trace's clock: armed at open (the trace's time 0), firing every
    ``interval`` seconds; a request at time t comes after every tick at or before t. The image's own timer has the
    scenario's interval; a modelled backing image is a node of its own, opened with QEMU's default interval (the
    overlay's option does not reach it). Interval 0 turns both off, as in every QEMU tool."""

    interval: int
    fired: int = 0
    backing_fired: int = 0
    untimed: bool = False  # a chunk without timestamps came: cleaning was not applied to it

    @property
    def backing_interval(self) -> int:
        return DEFAULT_CACHE_CLEAN_INTERVAL if self.interval else 0

    def segments(self, chunk: Trace):
        """(ticks of the image's timer, of the backing's, to fire first; requests) pieces of ``chunk``, in order."""
        if not self.interval or chunk.time is None or not len(chunk):
            self.untimed |= bool(self.interval) and chunk.time is None and len(chunk) > 0
            yield 0, 0, chunk
            return
        latest = max(float(chunk.time.max()), 0.0)
        if latest // self.interval <= self.fired and latest // self.backing_interval <= self.backing_fired:
            yield 0, 0, chunk  # no tick falls inside the chunk (the common case): no per-request clock needed
            return
        clock = np.maximum.accumulate(np.maximum(chunk.time, 0.0))
        due = np.floor_divide(clock, self.interval).astype(np.int64)
        below = np.floor_divide(clock, self.backing_interval).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, (due[1:] != due[:-1]) | (below[1:] != below[:-1])])
        for a, b in zip(starts, np.r_[starts[1:], len(chunk)]):
            ticks, backing_ticks = max(int(due[a]) - self.fired, 0), max(int(below[a]) - self.backing_fired, 0)
            self.fired += ticks
            self.backing_fired += backing_ticks
            yield ticks, backing_ticks, chunk if (a, b) == (0, len(chunk)) else chunk.select(slice(a, b))


def _clean(groups: list[_SliceGroup], ticks: int, backing_ticks: int) -> None:
    for group in groups:
        if ticks:
            group.model.clean(ticks)
            if group.coupled is not None:
                for caches in group.coupled.values():
                    caches.clean(ticks)
        layer = group.backing
        while backing_ticks and layer is not None:  # every qcow2 node of the chain has its own timer
            layer.model.clean(backing_ticks)
            layer = layer.below


class _Tick(NamedTuple):
    """Cache-cleaning ticks due before the next events (``_CleanTimer``), in a pipelined replay's stream."""

    ticks: int
    backing_ticks: int
    nbytes: int = 0


def _stage_1_stream(group: _SliceGroup, chunks: Iterable[Trace], timer: _CleanTimer, scenario: Scenario,
                    progress, seen: dict) -> Iterator:
    """Stage 1 of the one slice group over every chunk: its event chunks (PIPELINE_BUFFER_SETS buffer sets in
    turn) with the cleaning ticks in between; ``seen["source"]``: the trace's name."""
    size = group.run.original.geometry.virtual_size
    for chunk in chunks:
        seen["source"] = chunk.source
        chunk = apply_offset_policy(chunk, size, scenario.offset_policy)
        for ticks, backing_ticks, piece in timer.segments(chunk):
            if ticks or backing_ticks:
                yield _Tick(ticks, backing_ticks)
            yield from group.run.feed(piece, progress, buffer_sets=PIPELINE_BUFFER_SETS)


def _count(groups: list[_SliceGroup], n: int, events, shared: bool) -> None:
    """Stage 2 of slice group ``n`` over one event chunk: its caches (the coarser groups too when they share its
    stage 1) and its backing chain."""
    group = groups[n]
    if len(events.refcount_log) or group.coupled is not None:
        group.feed_refcount(events.key, events.kind, events.refcount_log)  # seeded before this chunk
    group.model.feed(events.key, events.kind, events.flush_at)
    if n == 0 and shared:
        for coarse in groups[1:]:
            shift = (coarse.entry_size // groups[0].entry_size).bit_length() - 1
            coarse.model.feed(events.key >> shift, events.kind, events.flush_at)
    if group.backing is not None and len(events.backing_offset):
        group.backing.feed(events)


def _feed_chunk(groups: list[_SliceGroup], chunk: Trace, progress, share_stage_1: bool) -> None:
    """Stage 1 and 2 of every slice group over one chunk of requests."""
    finest = groups[0].run
    # When the coarser slice sizes see the finest stream's events with shifted keys, stage 1 runs once. Only while
    # the image is the one given: after writes, each slice size's run keeps its own image state.
    shared = share_stage_1 and len(groups) > 1 and groups[0].backing is None \
        and all(g.run.work is None for g in groups) \
        and events_nest(chunk, finest.original, finest.entry_size, finest.unmap)
    before = finest.cnt.copy()
    for n, group in enumerate(groups):
        if n > 0 and shared:
            group.run.cnt += finest.cnt - before  # the same requests, reads and bytes; a read-only image is unchanged
            continue
        for events in group.run.feed(chunk, progress if n == 0 else None):
            _count(groups, n, events, shared)


def replay(
    trace: Trace | Iterable[Trace],
    scenario: Scenario = Scenario(),
    *,
    state: ImageState | None = None,
    below: tuple[ImageState, ...] = (),
    progress=None,
    share_stage_1: bool = True,
    fast_paths: bool = True,
    loaded: LoadedImage | None = None,
) -> ReplayResult:
    """Replay ``trace`` under ``scenario``: one row per cache configuration of ``scenario.caches``, in order.

    ``trace`` is a Trace, or an iterable of Trace chunks for a file larger than memory (``qsim.traceio.iter_trace``):
    allocation state and every cache carry across chunks, so the rows equal those of one whole-trace replay, and
    memory stays bounded by the chunk size, the image state and the caches (one small array per L2 slice); chunks
    need the scenario's image to have a size.

    ``state`` (with ``below``, the qcow2 layers of its backing chain whose own caches are modelled, nearest first)
    replaces the scenario's image by a state built in Python (tests, notebooks); it cannot travel to a fleet.
    ``loaded``: the scenario's image already loaded (``load_image``), e.g. as QEMU opens a given file (validate).
    ``progress`` is called with request counts. ``share_stage_1`` and ``fast_paths`` switch off two of the
    engine's shortcuts; results never depend on them (the tests compare both ways).
    """
    whole = trace if isinstance(trace, Trace) else None
    chunks: Iterable[Trace] = [trace] if whole is not None else trace
    if state is not None:
        loaded = LoadedImage(state, tuple(below))
    elif loaded is None:
        loaded = load_image(scenario.image, whole)
    image = loaded.state
    configs = [resolve_cache(image.geometry, settings, scenario.qemu_version) for settings in scenario.caches]
    groups = _slice_groups(image, loaded.below, configs, scenario, fast_paths)
    seen = {"source": "<memory>"}
    timer = _CleanTimer(scenario.cache_clean_interval)
    if len(groups) == 1 and (whole is None or len(whole) >= PIPELINE_MIN_REQUESTS):
        # One slice size: stage 1 runs up to three chunks ahead in a thread while stage 2 counts (both kernels
        # release the GIL); the results never depend on it.
        from .traceio.prefetch import prefetched

        for item in prefetched(_stage_1_stream(groups[0], chunks, timer, scenario, progress, seen),
                               budget_bytes=1 << 62, in_flight=PIPELINE_BUFFER_SETS):
            if isinstance(item, _Tick):
                _clean(groups, item.ticks, item.backing_ticks)
            else:
                _count(groups, 0, item, False)
    else:
        for chunk in chunks:
            seen["source"] = chunk.source
            chunk = apply_offset_policy(chunk, image.geometry.virtual_size, scenario.offset_policy)
            for ticks, backing_ticks, piece in timer.segments(chunk):
                if ticks or backing_ticks:
                    _clean(groups, ticks, backing_ticks)
                _feed_chunk(groups, piece, progress, share_stage_1)
    source = seen["source"]
    notes = loaded.notes
    if timer.untimed:
        notes += (f"{source}: the trace has no timestamps, so cache cleaning (cache-clean-interval="
                  f"{scenario.cache_clean_interval}) was not applied; cache_clean_interval is null",)
    interval = None if timer.untimed else scenario.cache_clean_interval
    rows: list[dict | None] = [None] * len(configs)
    for group in groups:
        chain_columns = group.backing.columns() if group.backing is not None else {}
        for n, (k, counts) in enumerate(zip(group.chosen, group.model.finish())):
            rows[k] = _row(source, image, group.run, configs[k], counts, scenario, scenario.caches[k],
                           group.refcount_counts(n))
            rows[k].update(cache_clean_interval=interval, cache_clean_ticks=timer.fired, l2_cleaned=counts.cleaned)
            rows[k]["backing_depth"] = max(len(loaded.chain), len(loaded.below), int(image.has_backing_file))
            rows[k].update(chain_columns)
    return ReplayResult([r for r in rows if r is not None], groups[-1].run.image, notes)


def asked_spelling(size: int | None) -> str:
    """How a row records the l2-cache-size asked for: as qemu-img writes sizes (``64k``), or ``default``."""
    return "default" if size is None else format_size(size)


def _row(source: str, image: ImageState, run: KernelRun, config: CacheConfig, counts: CacheCounts,
         scenario: Scenario, settings: CacheSettings, rc: RefcountCounts | None = None) -> dict:
    g = image.geometry
    counters = run.counters
    entry = config.l2_cache_entry_size
    reasons = inexact_reasons(run, config)
    if rc is not None and rc.divergence:
        # QEMU's refcount cache flushed the L2 cache where stage 1's stream did not (or the other way): the coupled
        # run's L2 counters are QEMU's (misses and lookups are the same either way)
        counts = replace(counts, disk_reads=rc.l2_disk_reads, evictions=rc.l2_evictions,
                         writebacks=rc.l2_writebacks, writebacks_at_close=rc.l2_writebacks_at_close)
    refcount = dict(refcount_lookups=0, refcount_misses=0, refcount_disk_reads=0, refcount_evictions=0,
                    refcount_writebacks=0, refcount_writebacks_at_close=0)
    if rc is not None:
        refcount = dict(refcount_lookups=rc.lookups, refcount_misses=rc.misses, refcount_disk_reads=rc.disk_reads,
                        refcount_evictions=rc.evictions, refcount_writebacks=rc.writebacks,
                        refcount_writebacks_at_close=rc.writebacks_at_close)
    cluster = g.cluster_size
    return {
        "trace": source,
        "virtual_size": g.virtual_size,
        "cluster_size": g.cluster_size,
        "extended_l2": g.extended_l2,
        "preallocation": image.description,
        "backing": image.has_backing_file,
        "cache_mode": scenario.cache_mode,
        "qemu_version": scenario.qemu_version,
        "l2_cache_size_asked": asked_spelling(settings.l2_cache_size),
        "cache_size_asked": asked_spelling(settings.cache_size),
        "refcount_cache_size_asked": asked_spelling(settings.refcount_cache_size),
        "refcount_cache_bytes": config.refcount_cache_bytes,
        "refcount_cache_entries": config.refcount_cache_entries,
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
        **refcount,
        "metadata_read_bytes": counts.disk_reads * entry + refcount["refcount_disk_reads"] * cluster,
        "metadata_write_bytes": counts.writebacks * entry + refcount["refcount_writebacks"] * cluster,
        "cow_read_bytes": counters["cow_read_bytes"],
        "cow_write_bytes": counters["cow_write_bytes"],
        "zero_fill_bytes": counters["zero_fill_bytes"],
        "guest_read_bytes": counters["guest_read_bytes"],
        "guest_write_bytes": counters["guest_write_bytes"],
        "l2_tables_allocated": counters["l2_tables_allocated"],
        "clusters_allocated": counters["clusters_allocated"],
        "discard": scenario.discard,
        "discard_no_unref": scenario.discard_no_unref,
        "discards": counters["discards"],
        "guest_discard_bytes": counters["guest_discard_bytes"],
        "clusters_discarded": counters["clusters_discarded"],
        "clusters_freed": counters["clusters_freed"],
        "discards_to_host": counters["discards_to_host"],
        "discarded_bytes": counters["discarded_bytes"],
        "image_file_bytes": run.image.file_bytes,
        "refcount_table_moves": counters["refcount_table_moves"],
        "full_l2_cache_bytes": g.full_l2_cache_bytes,
        "metadata_overhead_bytes": measure(g).required,
        "exact": not reasons,
        "inexact_reason": "; ".join(reasons),
    }


def inexact_reasons(run: KernelRun, config: CacheConfig) -> list[str]:
    """Why a row's counters may differ from a QEMU run (empty: they are QEMU's, exactly)."""
    counters = run.counters
    reasons = []
    if counters["racing_split_writes"]:
        reasons.append(f"{counters['racing_split_writes']} writes split into parts that QEMU runs as parallel tasks "
                       "while a later part flushes the L2 cache: QEMU's own write-backs vary from run to run")
    return reasons


__all__ = ["replay", "load_image", "default_virtual_size", "ReplayResult", "QsimError"]
