"""One replay scenario as one frozen value: everything a replay depends on except the trace.

It is built once, at the edge (the CLI's option parsing, or a user's Python), from typed values: sizes in bytes,
None wherever QEMU's default applies. It travels intact through ``replay``, ``sweep``, the fleet (local processes
and Dask workers: it pickles) and ``validate``, and its hash names a fleet's result parts, so an option can no
longer be dropped on one path and kept on another. A new option is a new field here, and nowhere else.

A ``Grid`` is a scenario swept over cluster sizes and extended_l2: one scenario per geometry (cache sizes cost
nothing extra inside one replay), with the combinations QEMU refuses returned, not printed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from .cachecfg import DEFAULT_QEMU_VERSION, CacheSettings, QemuVersion
from .errors import QsimError, UsageError
from .geometry import MIN_EXTENDED_L2_CLUSTER_SIZE
from .codes import CACHE_MODES, OFFSET_POLICIES
from .imageopts import ImageOptions

DISCARD_MODES = ("ignore", "unmap")  # QEMU's discard option: ignore (-drive/-blockdev/libvirt's default) or unmap
DISCARD_NO_UNREF_SINCE = (8, 1)  # QEMU release that added qcow2's discard-no-unref


DEFAULT_CACHE_CLEAN_INTERVAL = 600  # seconds: QEMU's default on Linux (block/qcow2.h)
MAX_CACHE_CLEAN_INTERVAL = 2**32 - 1  # UINT_MAX: QEMU refuses more ("Cache clean interval too big")


def content_id(values: dict) -> str:
    """16 hex digits of the SHA-256 of ``values`` as canonical JSON (sorted keys, no spaces): the name a fleet gives
    a configuration's result part, stable across processes and machines."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def doubling_sizes(low: int, high: int) -> tuple[int, ...]:
    """Cache sizes in bytes from ``low``, doubling, up to ``high`` (included even when it is not on the way)."""
    sizes = [low << k for k in range((high // low).bit_length())]
    return tuple(sizes if sizes[-1] == high else sizes + [high])


def log_spaced_sizes(low: int, high: int, count: int) -> tuple[int, ...]:
    """``count`` cache sizes in bytes, log-spaced from ``low`` to ``high``, rounded to 512 bytes (so there may be
    fewer when they are close): the points of a miss-ratio curve."""
    import numpy as np

    return tuple(sorted({max(512, int(round(p / 512)) * 512) for p in np.geomspace(low, high, count)}))


@dataclass(frozen=True)
class ImageSpec:
    """The image a trace is replayed against.

    Synthetic (the default): built from ``options`` (``-o``) on a disk of ``virtual_size`` bytes, or, when that is
    None, the trace's largest end offset rounded up to a whole GiB. Real: the qcow2 file at ``path`` (read-only),
    which decides size, geometry, allocation state and host layout, with its whole backing chain as QEMU opens it
    (each qcow2 layer's own L2 cache is modelled; a raw file has data everywhere).
    """

    options: ImageOptions = ImageOptions()
    virtual_size: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.path is not None and (self.options != ImageOptions() or self.virtual_size is not None):
            raise UsageError("--image decides the size, geometry and allocation state; drop -o and --size")
        if self.virtual_size is not None and self.virtual_size < 0:
            raise UsageError(f"--size {self.virtual_size}: a disk size is not negative")

    @property
    def is_real(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class Scenario:
    """Everything a replay depends on but the trace.

    - ``image``: the image (``ImageSpec``);
    - ``caches``: the cache configurations to report, one row each, as QEMU's options (``CacheSettings``: bytes,
      None = not given); all of them come from one pass over the trace;
    - ``cache_mode``: ``writeback`` (a VM's default) or ``writethrough`` (a flush after every write, qemu-io's);
    - ``offset_policy``: what a request ending beyond the disk gets: ``error``, ``skip`` or ``wrap``;
    - ``qemu_version``: whose cache defaults apply (``"7.2"``, ``"2.11"``, ``"10.0"``, ...);
    - ``discard``: QEMU's ``discard`` option, ``ignore`` (the default of -drive, -blockdev and libvirt: guest
      discards do nothing) or ``unmap`` (qemu-io's default, libvirt's ``discard='unmap'``: whole clusters are
      freed, qcow2_cluster_discard);
    - ``discard_no_unref``: qcow2's ``discard-no-unref=on`` (QEMU 8.1 and later): discarded clusters read as zeroes
      but stay allocated, refcounts unchanged.
    - ``cache_clean_interval``: QEMU's ``cache-clean-interval`` in whole seconds (600, QEMU's default on Linux;
      0 = off), applied from the trace's own timestamps (a trace without them is replayed without cleaning).
    - ``backing_caches``: the cache options of the qcow2 layers below a real image, nearest first, as QEMU takes
      them (``backing.l2-cache-size``, ``backing.backing.l2-cache-size``, ...); a layer without one gets what QEMU
      gives a backing node: its own defaults, never the top's options.
    """

    image: ImageSpec = ImageSpec()
    caches: tuple[CacheSettings, ...] = (CacheSettings(),)
    cache_mode: str = "writeback"
    offset_policy: str = "error"
    qemu_version: str = DEFAULT_QEMU_VERSION
    discard: str = "ignore"
    discard_no_unref: bool = False
    cache_clean_interval: int = DEFAULT_CACHE_CLEAN_INTERVAL
    backing_caches: tuple[CacheSettings, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.backing_caches, tuple):
            raise UsageError("backing_caches is a tuple of CacheSettings, one per layer below the image")
        if self.backing_caches and not self.image.is_real:
            raise UsageError("--backing-l2-cache-size goes with --image (a real image with a backing chain)")
        if not isinstance(self.caches, tuple) or not self.caches:
            raise UsageError("a scenario needs at least one cache configuration (a tuple of CacheSettings)")
        if self.cache_mode not in CACHE_MODES:
            raise UsageError(f"--cache-mode {self.cache_mode!r}: expected writeback or writethrough")
        if self.offset_policy not in OFFSET_POLICIES:
            raise UsageError(f"--offset-policy {self.offset_policy!r}: expected error, skip or wrap")
        version = QemuVersion.parse(self.qemu_version)
        object.__setattr__(self, "qemu_version", str(version))
        if self.discard not in DISCARD_MODES:
            raise UsageError(f"--discard {self.discard!r}: expected ignore or unmap")
        if self.discard_no_unref and version < DISCARD_NO_UNREF_SINCE:
            raise QsimError(f"--discard-no-unref with --qemu-version {version}: QEMU {version} says \"Block format "
                            "'qcow2' does not support the option 'discard-no-unref'\" (the option exists from QEMU "
                            f"{DISCARD_NO_UNREF_SINCE[0]}.{DISCARD_NO_UNREF_SINCE[1]})")
        interval = self.cache_clean_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or \
                not 0 <= interval <= MAX_CACHE_CLEAN_INTERVAL:
            raise UsageError(f"--cache-clean-interval {interval!r}: whole seconds from 0 (off) to "
                             f"{MAX_CACHE_CLEAN_INTERVAL}, as QEMU takes it")

    @classmethod
    def of(cls, l2_cache_sizes: tuple[int | None, ...] = (None,), l2_cache_entry_size: int | None = None,
           options: ImageOptions = ImageOptions(), virtual_size: int | None = None, **fields) -> Scenario:
        """A synthetic-image scenario from plain values: ``l2_cache_sizes`` in bytes (None = QEMU's default), one
        ``l2_cache_entry_size`` for all of them (None = as QEMU picks it)."""
        caches = tuple(CacheSettings(l2_cache_size=s, l2_cache_entry_size=l2_cache_entry_size)
                       for s in l2_cache_sizes)
        return cls(image=ImageSpec(options, virtual_size), caches=caches, **fields)

    @property
    def l2_cache_sizes(self) -> tuple[int | None, ...]:
        """The l2-cache-size of each cache configuration (bytes; None = QEMU's default)."""
        return tuple(c.l2_cache_size for c in self.caches)

    def with_geometry(self, cluster_size: int, extended_l2: bool) -> Scenario:
        """The same scenario on a synthetic image of another cluster size / extended_l2."""
        options = replace(self.image.options, cluster_size=cluster_size, extended_l2=extended_l2)
        return replace(self, image=replace(self.image, options=options))

    def to_dict(self) -> dict:
        """Plain JSON-able values (what the hash is taken of)."""
        return asdict(self)

    @property
    def config_id(self) -> str:
        """The scenario's ``content_id``: equal scenarios, equal ids, everywhere."""
        return content_id(self.to_dict())


@dataclass(frozen=True)
class Grid:
    """A scenario swept over cluster sizes (bytes) x extended_l2. With a real image the image fixes both, and the
    grid is the scenario alone."""

    scenario: Scenario = Scenario()
    cluster_sizes: tuple[int, ...] = (65536,)
    extended_l2: tuple[bool, ...] = (False,)

    def __post_init__(self) -> None:
        if self.scenario.image.is_real and (self.cluster_sizes != (65536,) or self.extended_l2 != (False,)):
            raise UsageError("--image fixes the cluster size and extended_l2; sweep only cache sizes with it")

    def expand(self) -> tuple[list[Scenario], list[str]]:
        """(one scenario per geometry QEMU accepts, in grid order; one line per combination it refuses)."""
        if self.scenario.image.is_real:
            return [self.scenario], []
        scenarios, skipped = [], []
        for cluster_size in self.cluster_sizes:
            for ext in self.extended_l2:
                if ext and cluster_size < MIN_EXTENDED_L2_CLUSTER_SIZE:
                    skipped.append(f"skipping cluster_size={cluster_size} with extended_l2=on "
                                   f"(QEMU needs at least {MIN_EXTENDED_L2_CLUSTER_SIZE // 1024}k)")
                    continue
                scenarios.append(self.scenario.with_geometry(cluster_size, ext))
        return scenarios, skipped
