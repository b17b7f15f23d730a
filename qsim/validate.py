"""``qsim validate``: the same trace through real qemu-io and through qsim, counter by counter."""

from __future__ import annotations

from dataclasses import dataclass

from .cachecfg import DEFAULT_QEMU_VERSION
from .imageopts import ImageOptions
from .qemu import qemu_version, replay_in_qemu
from .replay import replay
from .trace import Trace

COMPARED = ("l2_lookups", "l2_misses", "l2_disk_reads", "l2_evictions", "l2_writebacks", "l2_writebacks_at_close",
            "image_file_bytes")
MUST_MATCH = ("l2_misses", "l2_disk_reads")


@dataclass(frozen=True)
class Validation:
    qsim: dict
    qemu: dict
    qemu_version: str
    compared: tuple[str, ...] = COMPARED

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


def validate(trace: Trace, virtual_size: int, options: ImageOptions = ImageOptions(),
             l2_cache_size: int | None = None, l2_cache_entry_size: int | None = None,
             cache_mode: str = "writeback", progress=None, image_path: str | None = None) -> Validation:
    """Replay ``trace`` in qemu-io (on a scratch image built with qemu-img, or a scratch copy of ``image_path``) and
    in qsim, with the same options."""
    state = below = None
    if image_path is not None:
        from .image import backing_state, image_from_qcow2
        from .qcow2 import open_image

        img = open_image(image_path)
        state = image_from_qcow2(img)
        below = backing_state(img)  # QEMU's trace counts both images' caches; so does qsim then
        virtual_size = state.geometry.virtual_size
    ours = replay(trace, virtual_size, options, image=state, backing=below, l2_cache_sizes=[l2_cache_size],
                  l2_cache_entry_size=l2_cache_entry_size, cache_mode=cache_mode,
                  qemu_version=DEFAULT_QEMU_VERSION).rows[0]
    theirs = replay_in_qemu(trace, virtual_size, options, l2_cache_size, l2_cache_entry_size, cache_mode,
                            image=image_path, progress=progress).to_dict()
    qsim_counts = {k: ours[k] + ours.get("backing_" + k, 0) for k in COMPARED}
    qsim_counts.update(l2_cache_entries=ours["l2_cache_entries"], l2_cache_entry_size=ours["l2_cache_entry_size"])
    # With a backing image, QEMU's trace mixes both caches' slot numbers, so evictions cannot be told apart there.
    compared = tuple(k for k in COMPARED if not (below is not None and k == "l2_evictions"))
    return Validation(qsim_counts, theirs, qemu_version(), compared)
