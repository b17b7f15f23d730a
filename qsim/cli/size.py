"""``qsim size``: how much L2 cache a disk needs and what QEMU really builds."""

from __future__ import annotations

import argparse

from ..cachecfg import DEFAULT_QEMU_VERSION, CacheSettings, QemuVersion, largest_covered_disk
from ..errors import UsageError
from ..geometry import ImageGeometry
from ..imageopts import parse_image_options
from ..sizing import size_report
from ..units import format_size, parse_percent
from .common import RawDefaultsHelp, add_image_options, add_output, print_json, print_table, size_arg

EXAMPLES = """examples:
  qsim size 4T -o cluster_size=128k,extended_l2=on
  qsim size 1T --l2-cache-size 8M             # what an 8M cache covers on a 1T disk
  qsim size 1T --coverage 50%                 # the cache that covers half the disk
  qsim size --l2-cache-size 32M -o extended_l2=on   # the largest disk 32M covers
  qsim size 100G --qemu-version 2.11 --output=json
"""


def add_cache_options(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """The four QEMU cache options, spelled as QEMU spells them."""
    parser.add_argument("--l2-cache-size", type=size_arg("--l2-cache-size"), metavar="BYTES",
                        help="QEMU's l2-cache-size (default: QEMU's own, up to 32M on Linux)")
    parser.add_argument("--l2-cache-entry-size", type=size_arg("--l2-cache-entry-size"), metavar="BYTES",
                        help="QEMU's l2-cache-entry-size, the slice size: a power of two from 512 to the cluster size")
    parser.add_argument("--cache-size", type=size_arg("--cache-size"), metavar="BYTES",
                        help="QEMU's combined cache-size (what libvirt's metadata_cache max_size sets)")
    parser.add_argument("--refcount-cache-size", type=size_arg("--refcount-cache-size"), metavar="BYTES",
                        help="QEMU's refcount-cache-size (default 4 clusters)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "size",
        help="L2 cache a disk needs, the cache QEMU builds, settings to paste",
        description="The L2 cache that covers a qcow2 disk, the L2 and refcount caches QEMU actually builds for the "
        "given options (following block/qcow2.c read_cache_sizes), how much of the disk they cover, and "
        "-drive, -blockdev and libvirt settings ready to paste.",
        epilog=EXAMPLES,
        formatter_class=RawDefaultsHelp,
    )
    p.add_argument("size", nargs="?", type=size_arg("SIZE"), metavar="SIZE", help="virtual disk size, e.g. 100G, 4T")
    add_image_options(p, "cluster_size=64k, extended_l2=on|off, refcount_bits=16")
    add_cache_options(p)
    p.add_argument("--coverage", metavar="SHARE", help="size the cache to cover this share of the disk, e.g. 50%%")
    p.add_argument("--qemu-version", default=DEFAULT_QEMU_VERSION, metavar="X.Y",
                   help="apply that QEMU release's defaults (default %(default)s)")
    add_output(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    opts = parse_image_options(args.image_options, ("cluster_size", "extended_l2", "refcount_bits"))
    version = QemuVersion.parse(args.qemu_version)
    if args.size is None:
        return _largest_disk(args, opts)
    geometry = ImageGeometry(args.size, opts.cluster_size, opts.extended_l2, opts.refcount_bits)
    settings = CacheSettings(args.l2_cache_size, args.l2_cache_entry_size, args.cache_size, args.refcount_cache_size)
    if args.coverage and (args.l2_cache_size is not None or args.cache_size is not None):
        given = "--l2-cache-size" if args.l2_cache_size is not None else "--cache-size"
        raise UsageError(f"--coverage and {given} both choose the L2 cache size; give one of them")
    coverage = parse_percent(args.coverage, "--coverage") if args.coverage else None
    report = size_report(geometry, settings, str(version), coverage)
    if args.output == "json":
        print_json(report.to_dict())
        return 0
    d = report.to_dict()
    c = report.configured
    print(f"Disk {format_size(geometry.virtual_size)}, cluster_size={format_size(geometry.cluster_size)}, "
          f"extended_l2={'on' if geometry.extended_l2 else 'off'} ({geometry.l2_entry_bytes}-byte L2 entries), "
          f"QEMU {version}")
    print()
    print_table([
        ("L2 cache for the whole disk", f"{format_size(geometry.full_l2_cache_bytes)}  "
         f"({geometry.l2_tables} L2 tables of {format_size(geometry.cluster_size)}, one per "
         f"{format_size(geometry.bytes_per_l2_table)} of disk)"),
    ], indent="")
    asked = any(v is not None for v in (args.l2_cache_size, args.l2_cache_entry_size, args.cache_size,
                                        args.refcount_cache_size))
    print()
    print("The cache QEMU builds " + ("for these options:" if asked else "by default:"))
    print_table([
        ("L2 cache", f"{format_size(c.l2_cache_bytes)} = {c.l2_cache_entries} entries x "
         f"{format_size(c.l2_cache_entry_size)}" + (f"  (holds {format_size(c.l2_cache_ram_bytes)}: "
         "2 entries minimum)" if c.l2_cache_ram_bytes != c.l2_cache_bytes else "")),
        ("refcount cache", f"{format_size(c.refcount_cache_bytes)} = {c.refcount_cache_entries} entries x "
         f"{format_size(geometry.cluster_size)}"),
        ("covers", f"{format_size(c.covered_bytes)} of {format_size(geometry.virtual_size)} "
         f"({100 * c.covered_fraction:.4g}%)"),
    ])
    if args.cache_size is not None:
        print(f"  split           cache-size {format_size(args.cache_size)} = L2 {format_size(c.l2_cache_bytes)} + "
              f"refcount {format_size(args.cache_size - c.l2_cache_bytes)} (read_cache_sizes)")
    if asked:
        print(f"  (QEMU's default would be {format_size(d['default_l2_cache_bytes'])} = "
              f"{d['default_l2_cache_entries']} x {format_size(d['default_l2_cache_entry_size'])}, covering "
              f"{100 * d['default_covered_fraction']:.4g}%)")
    print()
    print(f"Settings for an L2 cache of {format_size(report.target_l2_cache_bytes)} ({report.target_reason}):")
    print(f"  {report.settings.drive}")
    print(f"  {report.settings.blockdev}")
    print(f"  libvirt: {report.settings.libvirt}")
    return 0


def _largest_disk(args: argparse.Namespace, opts) -> int:
    if args.l2_cache_size is None:
        raise UsageError("give a disk SIZE, or --l2-cache-size to ask which disk that cache covers")
    biggest = largest_covered_disk(args.l2_cache_size, opts.cluster_size, opts.extended_l2)
    result = {"l2_cache_bytes": args.l2_cache_size, "cluster_size": opts.cluster_size,
              "extended_l2": opts.extended_l2, "largest_covered_disk": biggest}
    if args.output == "json":
        print_json(result)
    else:
        print(f"l2-cache-size={format_size(args.l2_cache_size)} with cluster_size={format_size(opts.cluster_size)}, "
              f"extended_l2={'on' if opts.extended_l2 else 'off'} covers disks up to {format_size(biggest)}")
    return 0
