"""``qsim validate``: the same trace through real qemu-io and through qsim, counter by counter."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import UsageError
from .qcow2 import open_image
from .qemu import qemu_version, replay_in_qemu
from .image import record_file_at_open
from .replay import default_virtual_size, load_image, replay
from .scenario import Scenario
from .trace import Trace, apply_offset_policy

COMPARED = ("l2_lookups", "l2_misses", "l2_disk_reads", "l2_evictions", "l2_writebacks", "l2_writebacks_at_close",
            "image_file_bytes")
# The refcount cache's counters, compared whenever a qsim row has them (every row does now)
WHEN_MODELLED = ("refcount_lookups", "refcount_misses", "refcount_disk_reads", "refcount_evictions",
                 "refcount_writebacks", "refcount_writebacks_at_close")
CLEANING_NOTE = ("compared with cache cleaning off: qemu-io never runs the cleaner (its timer is on "
                 "QEMU_CLOCK_VIRTUAL, which only a running VM enables); see qsim.qemusystem for timed replays")


@dataclass(frozen=True)
class Validation:
    qsim: dict
    qemu: dict
    qemu_version: str
    compared: tuple[str, ...] = COMPARED
    requests: int = 0  # after the offset policy
    virtual_size: int = 0  # bytes

    @property
    def differences(self) -> dict[str, int]:
        return {k: self.qsim[k] - self.qemu[k] for k in self.compared if self.qsim[k] != self.qemu[k]}

    @property
    def match(self) -> bool:
        """Every compared counter agrees: lookups, misses, disk reads, evictions, write-backs during the run and at
        close, the image file's size (and the refcount counters, once qsim models them)."""
        return not self.differences

    def to_dict(self) -> dict:
        return {"qsim": self.qsim, "qemu": self.qemu, "match": self.match, "differences": self.differences,
                "compared": list(self.compared), "qemu_version": self.qemu_version,
                "cache_clean_interval": 0, "note": CLEANING_NOTE}


def validate(trace: Trace, scenario: Scenario, progress=None, qemu_io: str | None = None) -> Validation:
    """Replay ``trace`` in qemu-io (on a scratch image built with qemu-img, or a scratch copy of the scenario's real
    image) and in qsim, under the same scenario: one cache configuration, QEMU's options passed to qemu-io as is,
    the discard mode spelled out. The scenario's offset policy is applied first, so both sides see the same
    requests. ``qemu_io``: which qemu-io (qemu-img from the same folder); default $QSIM_QEMU_IO, else PATH's."""
    if len(scenario.caches) != 1:
        raise UsageError("validate compares one cache configuration at a time")
    settings = scenario.caches[0]
    combined = settings.cache_size is not None or settings.refcount_cache_size is not None
    if combined and scenario.image.is_real:
        raise UsageError("validate with cache-size or refcount-cache-size builds its own image; drop --image")
    spec = scenario.image
    if spec.is_real:
        virtual_size = open_image(spec.path).header.size
    else:
        virtual_size = default_virtual_size(trace) if spec.virtual_size is None else spec.virtual_size
        spec = replace(spec, virtual_size=virtual_size)
    # qemu-io never runs the cache cleaner: its timer is on QEMU_CLOCK_VIRTUAL, which only a running VM enables
    # (vm_start), whatever cache-clean-interval says. So the comparison is with cleaning off, on both sides.
    scenario = replace(scenario, image=spec, cache_clean_interval=0)
    trace = apply_offset_policy(trace, virtual_size, scenario.offset_policy)
    rows: list[dict] = []

    def qsim_side(path: str) -> None:
        """qsim's row for the very file QEMU opens: its allocated size (st_blocks, which depends on the filesystem)
        decides how far QEMU's one-time preallocation scan reads refcounts."""
        loaded = load_image(spec, trace)
        record_file_at_open(loaded.state.alloc_state, path, loaded.state.geometry.cluster_size)
        rows.append(replay(trace, scenario, loaded=loaded).rows[0])

    if combined:  # qemu-io cannot take these options with -t; qemu-system's drive can (same counters, cleaning off)
        from .qemusystem import find_qemu_system, replay_timed, system_version

        if scenario.discard != "ignore" or scenario.discard_no_unref:
            raise UsageError("validate with cache-size or refcount-cache-size runs qemu-system with discard=ignore; "
                             "drop --discard unmap / --discard-no-unref there")
        binary = find_qemu_system()
        timed = replay_timed(binary, trace, virtual_size, spec.options, cache_clean_interval=0, time_scale=None,
                             l2_cache_size=settings.l2_cache_size, l2_cache_entry_size=settings.l2_cache_entry_size,
                             cache_size=settings.cache_size, refcount_cache_size=settings.refcount_cache_size,
                             cache_mode=scenario.cache_mode, before_run=qsim_side)
        theirs, version = timed.counts, system_version(binary)
        if progress is not None:
            progress(len(trace))
    else:
        theirs = replay_in_qemu(trace, virtual_size, spec.options, settings.l2_cache_size,
                                settings.l2_cache_entry_size, scenario.cache_mode, image=spec.path, progress=progress,
                                discard=scenario.discard, discard_no_unref=scenario.discard_no_unref,
                                qemu_io=qemu_io, backing_caches=scenario.backing_caches,
                                before_run=qsim_side).to_dict()
        version = qemu_version(qemu_io)
    ours = rows[0]
    shown = COMPARED + tuple(k for k in WHEN_MODELLED if k in ours)
    # QEMU's trace counts every layer's cache (its lines do not say which cache), so qsim's layers are summed
    qsim_counts = {k: ours[k] + sum(ours.get(f"backing{d if d > 1 else ''}_{k}", 0)
                                    for d in range(1, ours.get("backing_depth", 0) + 1)) for k in shown}
    qsim_counts.update(l2_cache_entries=ours["l2_cache_entries"], l2_cache_entry_size=ours["l2_cache_entry_size"])
    # With a backing image, QEMU's trace mixes the caches' slot numbers, so evictions cannot be told apart there.
    with_backing = "backing_l2_lookups" in ours
    compared = tuple(k for k in shown if not (with_backing and k in ("l2_evictions", "refcount_evictions")))
    return Validation(qsim_counts, theirs, version, compared, len(trace), virtual_size)
