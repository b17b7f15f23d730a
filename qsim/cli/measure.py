"""``qsim measure``: metadata overhead of a new image, byte-exact with ``qemu-img measure``."""

from __future__ import annotations

import argparse

from ..geometry import ImageGeometry, measure
from ..imageopts import parse_image_options
from ..units import format_size
from .common import RawDefaultsHelp, add_image_options, add_output, print_json, print_table, size_arg

EXAMPLES = """examples:
  qsim measure 2T                                  # same numbers as: qemu-img measure -O qcow2 --size 2T
  qsim measure 2T -o cluster_size=2M,extended_l2=on --output=json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "measure",
        help="metadata overhead, the numbers qemu-img measure prints",
        description="The 'required' and 'fully-allocated' sizes of a new qcow2 image, byte for byte what "
        "'qemu-img measure -O qcow2 --size SIZE -o ...' prints, and (in human form) the breakdown by structure.",
        epilog=EXAMPLES,
        formatter_class=RawDefaultsHelp,
    )
    p.add_argument("size", type=size_arg("SIZE"), metavar="SIZE", help="virtual disk size, e.g. 10M, 2T")
    add_image_options(p, "cluster_size=64k, extended_l2=on|off, refcount_bits=16")
    add_output(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    opts = parse_image_options(args.image_options, ("cluster_size", "extended_l2", "refcount_bits"))
    geometry = ImageGeometry(args.size, opts.cluster_size, opts.extended_l2, opts.refcount_bits)
    m = measure(geometry)
    if args.output == "json":
        print_json({"required": m.required, "fully-allocated": m.fully_allocated})
        return 0
    share = m.metadata_bytes / max(geometry.virtual_size, 1)
    print(f"qcow2 image of {format_size(geometry.virtual_size)}, cluster_size={format_size(geometry.cluster_size)}, "
          f"extended_l2={'on' if geometry.extended_l2 else 'off'}, refcount_bits={geometry.refcount_bits}")
    print_table([
        ("required", f"{m.required}"),
        ("fully-allocated", f"{m.fully_allocated}"),
    ])
    print("metadata of a fully allocated image:")
    print_table([
        ("header", f"{m.header_bytes:>16}  {format_size(m.header_bytes)}"),
        ("L1 table", f"{m.l1_bytes:>16}  {format_size(m.l1_bytes)}"),
        ("L2 tables", f"{m.l2_bytes:>16}  {format_size(m.l2_bytes)}"),
        ("refcount table", f"{m.refcount_table_bytes:>16}  {format_size(m.refcount_table_bytes)}"),
        ("refcount blocks", f"{m.refcount_block_bytes:>16}  {format_size(m.refcount_block_bytes)}"),
        ("total", f"{m.metadata_bytes:>16}  {format_size(m.metadata_bytes)}  "
                  f"({100 * share:.3g}% of the disk)"),
    ])
    return 0
