"""``qsim inspect``: describe a real qcow2 image (read-only), and the L2 cache it needs."""

from __future__ import annotations

import argparse
import sys

from ..units import format_size, human_size
from .common import RawDefaultsHelp, add_output, print_json, print_table

EXAMPLES = """examples:
  qsim inspect disk.qcow2
  qsim inspect disk.qcow2 --output=json
  qsim inspect disk.qcow2 --map            # guest -> host extents, like qemu-img map --output=json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="what a real qcow2 image holds and the L2 cache it needs (read-only)",
                       description="Reads the image read-only (never writes, never locks) and describes its header, "
                       "tables, clusters, host layout, refcounts and L2 cache needs. An image QEMU would refuse, or "
                       "that qemu-img check calls corrupt, is refused with one line naming the structure and offset.",
                       epilog=EXAMPLES, formatter_class=RawDefaultsHelp)
    p.add_argument("image", metavar="IMG")
    p.add_argument("--map", action="store_true", help="print guest -> host extents instead (streamed, backing files "
                   "included, as qemu-img map)")
    p.add_argument("--qemu-version", metavar="X.Y", default=None,
                   help="with --map --output=json, print what this QEMU's qemu-img map prints (default: the "
                   "qemu-img on PATH, else 7.2; 8.2 and later add a \"compressed\" key)")
    add_output(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..inspect import format_map_entry, guest_map, inspect_image, parse_version

    if args.map:
        version = parse_version(args.qemu_version) if args.qemu_version else None
        extents = guest_map(args.image, version)
        out = sys.stdout
        if args.output == "json":
            out.write("[")
            for i, e in enumerate(extents):
                out.write((",\n" if i else "") + format_map_entry(e))
            out.write("]\n")
        else:
            for e in extents:
                where = f"host {e['offset']:#x}" if "offset" in e else ("compressed" if e["data"] else
                                                                       ("zeroes" if e["present"] else "unallocated"))
                depth = f" (backing {e['depth']})" if e["depth"] else ""
                out.write(f"{e['start']:#16x} {human_size(e['length']):>10}  {where}{depth}\n")
        return 0
    info = inspect_image(args.image)
    for warning in info["warnings"]:
        print(f"qsim inspect: warning: {args.image}: {warning}", file=sys.stderr)
    if args.output == "json":
        print_json(info)
        return 0
    print(f"{args.image}: qcow2 v{info['version']}, {format_size(info['virtual_size'])} virtual, "
          f"cluster_size={format_size(info['cluster_size'])}, extended_l2={'on' if info['extended_l2'] else 'off'}, "
          f"refcount_bits={info['refcount_bits']}, file {human_size(info['file_bytes'])}")
    rows = [
        ("backing file", f"{info['backing_file']} ({info['backing_format'] or 'format not recorded'})"
         if info["backing_file"] else "none"),
        ("L1 entries used", f"{info['l1_entries_used']} of {info['l1_entries']}"),
        ("clusters", f"{info['clusters_allocated']} data, {info['clusters_zero']} zero, "
                     f"{info['clusters_compressed']} compressed, {info['clusters_unallocated']} unallocated "
                     f"(of {info['clusters']})"),
    ]
    if info["extended_l2"]:
        rows.append(("subclusters", f"{info['subclusters_allocated']} allocated, {info['subclusters_zero']} zero"))
    rows += [
        ("host layout", f"{info['host_runs']} contiguous runs ({100 * info['fragmented_share']:.3g}% of data "
                        "clusters start a new run)"),
        ("metadata", f"{human_size(info['metadata_bytes'])} ({100 * info['metadata_share_of_file']:.3g}% of the "
                     f"file), {info['refcount_blocks']} refcount blocks"),
        ("L2 cache", f"{format_size(info['l2_cache_for_allocated_tables'])} holds the allocated tables, "
                     f"{format_size(info['full_l2_cache_bytes'])} the whole disk"),
        ("QEMU default", f"{format_size(info['default_l2_cache_bytes'])} = {info['default_l2_cache_entries']} x "
                         f"{format_size(info['default_l2_cache_entry_size'])}: "
                         + ("covers the allocated tables" if info["default_covers_allocated_tables"]
                            else "does NOT cover the allocated tables")),
    ]
    for link in info["backing_chain"]:
        rows.append(("  backing", f"{link['path']} ({link['format']})" + (f": {link['error']}" if "error" in link
                                                                          else "")))
    print_table(rows)
    return 0
