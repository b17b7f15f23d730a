"""``qsim validate``: the same trace through real qemu-io and through qsim, counter by counter."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import UsageError
from .qcow2 import open_image
from .qemu import qemu_version, replay_in_qemu
from .replay import default_virtual_size, replay
from .scenario import Scenario
from .trace import Trace, apply_offset_policy

COMPARED = ("l2_lookups", "l2_misses", "l2_disk_reads", "l2_evictions", "l2_writebacks", "l2_writebacks_at_close",
            "image_file_bytes")
MUST_MATCH = ("l2_misses", "l2_disk_reads")


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
        """Misses and disk reads agree (the numbers qsim exists for); other counters are shown side by side."""
        return all(self.qsim[k] == self.qemu[k] for k in MUST_MATCH)

    def to_dict(self) -> dict:
        return {"qsim": self.qsim, "qemu": self.qemu, "match": self.match, "differences": self.differences,
                "compared": list(self.compared), "qemu_version": self.qemu_version}


def validate(trace: Trace, scenario: Scenario, progress=None) -> Validation:
    """Replay ``trace`` in qemu-io (on a scratch image built with qemu-img, or a scratch copy of the scenario's real
    image) and in qsim, under the same scenario: one cache configuration, QEMU's options passed to qemu-io as is.
    The scenario's offset policy is applied first, so both sides see the same requests."""
    if len(scenario.caches) != 1:
        raise UsageError("validate compares one cache configuration at a time")
    settings = scenario.caches[0]
    if settings.cache_size is not None or settings.refcount_cache_size is not None:
        raise UsageError("validate passes l2-cache-size and l2-cache-entry-size to qemu-io; not cache-size or "
                         "refcount-cache-size yet")
    spec = scenario.image
    if spec.is_real:
        virtual_size = open_image(spec.path).header.size
    else:
        virtual_size = default_virtual_size(trace) if spec.virtual_size is None else spec.virtual_size
        spec = replace(spec, virtual_size=virtual_size)
    scenario = replace(scenario, image=spec)
    trace = apply_offset_policy(trace, virtual_size, scenario.offset_policy)
    result = replay(trace, scenario)
    ours = result.rows[0]
    theirs = replay_in_qemu(trace, virtual_size, spec.options, settings.l2_cache_size, settings.l2_cache_entry_size,
                            scenario.cache_mode, image=spec.path, progress=progress,
                            backing_caches=scenario.backing_caches).to_dict()
    # QEMU's trace counts every layer's cache (its lines do not say which cache), so qsim's layers are summed
    qsim_counts = {k: ours[k] + sum(ours.get(f"backing{d if d > 1 else ''}_{k}", 0)
                                    for d in range(1, ours.get("backing_depth", 0) + 1)) for k in COMPARED}
    qsim_counts.update(l2_cache_entries=ours["l2_cache_entries"], l2_cache_entry_size=ours["l2_cache_entry_size"])
    # With a backing image, QEMU's trace mixes the caches' slot numbers, so evictions cannot be told apart there.
    with_backing = "backing_l2_lookups" in ours
    compared = tuple(k for k in COMPARED if not (with_backing and k == "l2_evictions"))
    return Validation(qsim_counts, theirs, qemu_version(), compared, len(trace), virtual_size)
