"""``-o key=val,...`` image options, spelled as qemu-img spells them, parsed once for every subcommand."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .units import parse_size

_BOOL = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}
PREALLOCATION_MODES = ("off", "metadata")


@dataclass(frozen=True)
class ImageOptions:
    """Image creation options: geometry (cluster_size bytes, extended_l2, refcount_bits) and the starting state.

    ``preallocation`` is ``off`` (fresh image, no L2 tables) or ``metadata`` (every L2 table and cluster allocated,
    host-contiguous in guest order); ``fill`` (0..1) instead allocates that share of clusters, seeded by ``seed``,
    like a disk that has been in use. ``backing`` says whether a backing file sits below (COW copies data then).
    """

    cluster_size: int = 65536
    extended_l2: bool = False
    refcount_bits: int = 16
    preallocation: str = "off"
    backing: bool = False
    fill: float = 0.0
    seed: int = 0


def _parse_bool(key: str, value: str) -> bool:
    try:
        return _BOOL[value.lower()]
    except KeyError:
        raise UsageError(f"-o {key}={value}: expected on or off") from None


def parse_image_options(text: str | None, allowed: tuple[str, ...] | None = None) -> ImageOptions:
    """``"cluster_size=128k,extended_l2=on"`` -> ImageOptions. ``allowed`` limits the keys a subcommand takes."""
    fields: dict[str, object] = {}
    if not text:
        return ImageOptions()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        value = value.strip()
        known = ("cluster_size", "extended_l2", "refcount_bits", "preallocation", "backing", "fill", "seed")
        if key not in known or (allowed is not None and key not in allowed):
            choices = ", ".join(allowed if allowed is not None else known)
            raise UsageError(f"-o: invalid parameter {key!r} (this command takes: {choices})")
        if not sep and key != "extended_l2" and key != "backing":
            raise UsageError(f"-o {key}: missing value (write {key}=VALUE)")
        if key == "cluster_size":
            fields[key] = parse_size(value, "-o cluster_size")
        elif key in ("extended_l2", "backing"):
            fields[key] = _parse_bool(key, value) if sep else True
        elif key == "refcount_bits":
            try:
                fields[key] = int(value)
            except ValueError:
                raise UsageError(f"-o refcount_bits={value}: expected a whole number (1, 2, 4, ... 64)") from None
        elif key == "preallocation":
            if value.startswith("fill="):  # accept preallocation=fill=0.3 as a spelling of fill=0.3
                key, value = "fill", value[5:]
            elif value not in PREALLOCATION_MODES:
                raise UsageError(f"-o preallocation={value}: expected off or metadata (or fill=SHARE)")
            else:
                fields[key] = value
                continue
        if key == "fill":
            try:
                share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
            except ValueError:
                raise UsageError(f"-o fill={value}: expected a share of clusters, e.g. 0.3 or 30%") from None
            if not 0 <= share <= 1:
                raise UsageError(f"-o fill={value}: must be between 0 and 1")
            fields["fill"] = share
        elif key == "seed":
            if not (value.isascii() and value.isdigit()) or len(value) > 30:
                raise UsageError(f"-o seed={value[:40]}: expected a whole number from 0")
            fields[key] = int(value)
    return ImageOptions(**fields)  # type: ignore[arg-type]
