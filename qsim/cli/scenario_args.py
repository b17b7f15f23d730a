"""The command line's side of a scenario: the options replay, sweep and validate share, parsed once into typed
values (``qsim.scenario.Scenario``, ``qsim.traceio.reading.ReadOptions``); the library never sees their text.

``SCENARIO_DESTS`` and ``READING_DESTS`` name every option that lands in a scenario or in how a trace is read;
the equivalence test holds them to the parsers, so an option added to a parser and not here fails a test.
"""

from __future__ import annotations

import argparse

from ..cachecfg import DEFAULT_QEMU_VERSION, CacheSettings
from ..codes import CACHE_MODES, OFFSET_POLICIES
from ..errors import UsageError
from ..scenario import (DEFAULT_CACHE_CLEAN_INTERVAL, DISCARD_MODES, MAX_CACHE_CLEAN_INTERVAL, doubling_sizes,
                        log_spaced_sizes)
from ..units import parse_size
from .common import add_image_options, size_arg

IMAGE_KEYS = "cluster_size=64k, extended_l2=on|off, refcount_bits=16, preallocation=off|metadata, fill=0.3, " \
             "seed=0, backing=on|off"
SWEEP_IMAGE_KEYS = ("refcount_bits", "preallocation", "fill", "seed", "backing")  # geometry comes from the grid
MAX_CACHE_CONFIGS = 1000  # rows one replay reports: far more than a miss-ratio curve needs, small enough to print
MIN_CACHE_SIZE_IN_RANGE = 512

SCENARIO_DESTS = frozenset({"size", "image", "image_options", "l2_cache_size", "l2_cache_entry_size", "cache_mode",
                            "offset_policy", "qemu_version", "discard", "discard_no_unref", "cache_clean_interval",
                            "cache_size", "refcount_cache_size", "backing_l2_cache_size",
                            "backing_l2_cache_entry_size"})
BACKING_CHAIN_NOTE = "--backing-chain is no longer needed: --image always opens the whole backing chain, as QEMU does"
READING_DESTS = frozenset({"format", "file", "action", "device", "volume"})


def parse_cache_sizes(text: str | None, option: str = "--l2-cache-size") -> tuple[int | None, ...]:
    """``"64k,256k,1M,default"``, ``"64k..64M"`` (powers of two from the first) or ``"64k..64M:20"`` (20
    log-spaced sizes, rounded to 512 bytes) -> bytes, None standing for QEMU's default; each size once, in order."""
    if text is None or not str(text).strip():
        return (None,)
    sizes: list[int | None] = []
    for item in str(text).split(","):
        item = item.strip()
        if item.lower() == "default":
            sizes.append(None)
        elif ".." in item:
            sizes.extend(_parse_range(item, option))
        else:
            sizes.append(parse_size(item, option))
        if len(sizes) > MAX_CACHE_CONFIGS:
            break
    unique = tuple(dict.fromkeys(sizes))
    if len(unique) > MAX_CACHE_CONFIGS:
        raise UsageError(f"{option} {str(text)[:60]}: more than {MAX_CACHE_CONFIGS} cache sizes; a miss-ratio curve "
                         "needs a few dozen (e.g. 64k..64M:40)")
    return unique


def _parse_range(item: str, option: str) -> list[int]:
    low, _, rest = item.partition("..")
    high, _, count = rest.partition(":")
    lo, hi = parse_size(low, option), parse_size(high, option)
    if lo < MIN_CACHE_SIZE_IN_RANGE or hi < lo:
        raise UsageError(f"{option} {item}: a range goes from {MIN_CACHE_SIZE_IN_RANGE} bytes or more up, "
                         "e.g. 64k..64M")
    if not count:
        return list(doubling_sizes(lo, hi))
    if not count.isascii() or not count.isdigit():
        raise UsageError(f"{option} {item}: the count after ':' must be a whole number")
    n = int(count)
    if n < 2 or n > MAX_CACHE_CONFIGS:
        raise UsageError(f"{option} {item}: a range takes 2 to {MAX_CACHE_CONFIGS} points")
    return list(log_spaced_sizes(lo, hi, n))


def add_scenario_options(p: argparse.ArgumentParser, sweep: bool = False, one_cache: bool = False) -> None:
    """The options that make a scenario (``SCENARIO_DESTS``). ``sweep``: the geometry comes from --cluster-size and
    --extended-l2, not -o; ``one_cache`` (validate): --l2-cache-size takes one size, and there is no
    --backing-chain (a no-op kept for old scripts: the chain is always opened, as QEMU opens it)."""
    p.add_argument("--size", type=size_arg("--size"),
                   help="virtual disk size (default: the trace's largest end offset rounded up to a whole GiB)")
    p.add_argument("--image", metavar="IMG", help="replay against this real qcow2 image's allocation state and host "
                   "layout (read-only; it decides size and geometry)")
    if not one_cache:
        p.add_argument("--backing-chain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backing-l2-cache-size", metavar="LIST", default=None,
                   help="with --image: QEMU's backing.l2-cache-size, backing.backing.l2-cache-size, ... for the qcow2 "
                        "layers below, nearest first (e.g. 1M,default); a layer not given gets a backing node's "
                        "own defaults, as in QEMU")
    p.add_argument("--backing-l2-cache-entry-size", metavar="LIST", default=None,
                   help="with --image: backing.l2-cache-entry-size per layer below, nearest first")
    add_image_options(p, ", ".join(k for k in IMAGE_KEYS.split(", ") if k.split("=")[0] in SWEEP_IMAGE_KEYS)
                      if sweep else IMAGE_KEYS)
    if one_cache:
        p.add_argument("--l2-cache-size", type=size_arg("--l2-cache-size"), metavar="BYTES",
                       help="QEMU's l2-cache-size (default: QEMU's default)")
    else:
        p.add_argument("--l2-cache-size", default=None, metavar="LIST",
                       help="cache sizes: a list (64k,256k,1M,default), a range of powers of two (64k..64M) or N "
                            "log-spaced sizes (64k..64M:20); default: QEMU's default")
    p.add_argument("--l2-cache-entry-size", type=size_arg("--l2-cache-entry-size"), metavar="BYTES",
                   help="force the slice size (default: as QEMU picks it for each cache size)")
    if one_cache:
        p.add_argument("--cache-size", type=size_arg("--cache-size"), metavar="BYTES",
                       help="QEMU's combined cache-size (libvirt's metadata_cache max_size), split between the L2 "
                            "and refcount caches as QEMU splits it")
    else:
        p.add_argument("--cache-size", default=None, metavar="LIST",
                       help="QEMU's combined cache-size (libvirt's metadata_cache max_size), split between the L2 "
                            "and refcount caches as QEMU splits it: a list or range like --l2-cache-size "
                            "(1M..64M); with --l2-cache-size, every pair")
    p.add_argument("--refcount-cache-size", type=size_arg("--refcount-cache-size"), metavar="BYTES",
                   help="QEMU's refcount-cache-size (default: 4 clusters, QEMU's minimum)")
    p.add_argument("--cache-mode", choices=CACHE_MODES, default="writeback",
                   help="writeback (a VM's default) or writethrough (a flush after every write)")
    p.add_argument("--offset-policy", choices=OFFSET_POLICIES, default="error",
                   help="requests ending beyond --size: error (default), skip or wrap")
    p.add_argument("--cache-clean-interval", type=_interval_arg, default=DEFAULT_CACHE_CLEAN_INTERVAL, metavar="S",
                   help="QEMU's cache-clean-interval in seconds, applied from the trace's timestamps (default "
                        f"{DEFAULT_CACHE_CLEAN_INTERVAL}, as QEMU on Linux; 0 = off; a trace without timestamps "
                        "is not cleaned)")
    p.add_argument("--qemu-version", default=DEFAULT_QEMU_VERSION, metavar="X.Y",
                   help=f"cache defaults of that QEMU (default {DEFAULT_QEMU_VERSION})")
    p.add_argument("--discard", choices=DISCARD_MODES, default="ignore",
                   help="QEMU's discard option: ignore (the default of -drive, -blockdev and libvirt) or unmap "
                        "(libvirt's discard='unmap', qemu-io's default): trims free whole clusters")
    p.add_argument("--discard-no-unref", action="store_true",
                   help="qcow2's discard-no-unref=on (QEMU >= 8.1): discarded clusters read as zeroes but stay "
                        "allocated")


def _interval_arg(text: str) -> int:
    if not text.strip().isascii() or not text.strip().isdigit() or int(text) > MAX_CACHE_CLEAN_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text!r}: whole seconds, 0 (off) to {MAX_CACHE_CLEAN_INTERVAL}")
    return int(text)


def scenario_from_args(args: argparse.Namespace, sweep: bool = False, virtual_size: int | None = None):
    """The Scenario the parsed options describe. ``virtual_size`` (bytes) stands in for a --size not given, when
    the caller measured the trace."""
    from ..imageopts import parse_image_options
    from ..scenario import ImageSpec, Scenario

    options = parse_image_options(args.image_options, SWEEP_IMAGE_KEYS if sweep else None)
    if args.image:
        if args.image_options or args.size:
            raise UsageError("--image decides the size, geometry and allocation state; drop -o and --size")
        image = ImageSpec(path=args.image)
    else:
        if getattr(args, "backing_chain", False):
            raise UsageError("--backing-chain goes with --image")
        image = ImageSpec(options, args.size if args.size is not None else virtual_size)
    if getattr(args, "backing_chain", False):
        import sys

        print(f"note: {BACKING_CHAIN_NOTE}", file=sys.stderr)
    if isinstance(args.l2_cache_size, str) or args.l2_cache_size is None:
        sizes = parse_cache_sizes(args.l2_cache_size)
    else:
        sizes = (args.l2_cache_size,)
    combined = args.cache_size
    if isinstance(combined, str) or combined is None:
        combined = parse_cache_sizes(combined, "--cache-size")
    else:
        combined = (combined,)
    if len(sizes) * len(combined) > MAX_CACHE_CONFIGS:
        raise UsageError(f"--l2-cache-size x --cache-size: more than {MAX_CACHE_CONFIGS} cache configurations")
    caches = tuple(CacheSettings(l2_cache_size=s, l2_cache_entry_size=args.l2_cache_entry_size, cache_size=c,
                                 refcount_cache_size=args.refcount_cache_size) for c in combined for s in sizes)
    return Scenario(image=image, caches=caches, cache_mode=args.cache_mode, offset_policy=args.offset_policy,
                    qemu_version=args.qemu_version, discard=args.discard, discard_no_unref=args.discard_no_unref,
                    cache_clean_interval=args.cache_clean_interval, backing_caches=backing_caches_from(args))


def backing_caches_from(args: argparse.Namespace) -> tuple[CacheSettings, ...]:
    """--backing-l2-cache-size / --backing-l2-cache-entry-size: one value per layer below ("default" or empty: not
    given), nearest first -> one CacheSettings per layer, trailing defaults dropped."""
    sizes = _per_layer(args.backing_l2_cache_size, "--backing-l2-cache-size")
    entries = _per_layer(args.backing_l2_cache_entry_size, "--backing-l2-cache-entry-size")
    depth = max(len(sizes), len(entries))
    sizes += (None,) * (depth - len(sizes))
    entries += (None,) * (depth - len(entries))
    layers = [CacheSettings(l2_cache_size=s, l2_cache_entry_size=e) for s, e in zip(sizes, entries)]
    while layers and layers[-1] == CacheSettings():
        layers.pop()
    return tuple(layers)


def _per_layer(text: str | None, option: str) -> tuple[int | None, ...]:
    if text is None:
        return ()
    return tuple(None if not item.strip() or item.strip().lower() == "default" else parse_size(item.strip(), option)
                 for item in text.split(","))


def reading_from_args(args: argparse.Namespace):
    """How the parsed options say to read the trace (``READING_DESTS``)."""
    from ..traceio.reading import ReadOptions

    return ReadOptions(format=args.format, file=args.file, action=args.action, device=args.device,
                       volume=args.volume)
