"""``qsim validate``: run a trace through real QEMU and through qsim, side by side."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ..imageopts import parse_image_options
from ..progress import progress_bar
from ..qemu import describe, find_tool
from ..replay import CACHE_MODES, default_virtual_size
from ..trace import OFFSET_POLICIES, apply_offset_policy
from ..validate import COMPARED, validate
from .common import RawDefaultsHelp, add_image_options, print_json, size_arg
from .replay import IMAGE_KEYS
from .trace import add_reader_options, load_trace

EXAMPLES = """examples:
  qsim validate traces/fio-randrw-mixed-fsync.iolog.gz -o preallocation=metadata --l2-cache-size 64k
  qsim validate traces/fio-randwrite-4k.iolog.gz -o cluster_size=128k,extended_l2=on --cache-mode writethrough
exit status: 0 misses and disk reads agree, 1 they differ, 2 QEMU is not installed (apt-get install -y qemu-utils)
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="replay a trace in real qemu-io and in qsim; compare the counters",
                       description="Builds the image with qemu-img in a scratch directory (removed afterwards, even "
                       "on Ctrl-C), replays the trace through qemu-io with qcow2 cache tracing, runs qsim on the "
                       "same input and prints both side by side.", epilog=EXAMPLES,
                       formatter_class=RawDefaultsHelp)
    p.add_argument("trace", metavar="TRACE")
    add_reader_options(p)
    p.add_argument("--size", type=size_arg("--size"), help="virtual size (default: trace end rounded up to a GiB)")
    p.add_argument("--image", metavar="IMG", help="replay on a scratch copy of this real image (never on it)")
    add_image_options(p, IMAGE_KEYS)
    p.add_argument("--l2-cache-size", type=size_arg("--l2-cache-size"), metavar="BYTES",
                   help="QEMU's l2-cache-size (default: QEMU's default)")
    p.add_argument("--l2-cache-entry-size", type=size_arg("--l2-cache-entry-size"), metavar="BYTES")
    p.add_argument("--cache-mode", choices=CACHE_MODES, default="writeback")
    p.add_argument("--offset-policy", choices=OFFSET_POLICIES, default="error")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    find_tool("qemu-io")
    find_tool("qemu-img")
    options = parse_image_options(args.image_options)
    trace = load_trace(args)
    if len(trace) == 0:
        raise UsageError(f"{args.trace}: the trace has no requests")
    if args.image:
        from ..qcow2 import open_image

        if args.image_options or args.size:
            raise UsageError("--image decides the size, geometry and allocation state; drop -o and --size")
        size = open_image(args.image).header.size
    else:
        size = args.size or default_virtual_size(trace)
    trace = apply_offset_policy(trace, size, args.offset_policy)
    with progress_bar(total=len(trace), unit="req", desc="qemu-io") as bar:
        result = validate(trace, size, options, args.l2_cache_size, args.l2_cache_entry_size, args.cache_mode,
                          progress=bar.update, image_path=args.image)
    if args.output == "json":
        print_json(result.to_dict())
    else:
        where = args.image if args.image else describe(options, size)
        print(f"{args.trace}: {len(trace)} requests on {where}, {args.cache_mode}, "
              f"L2 cache {result.qsim['l2_cache_entries']} x {result.qsim['l2_cache_entry_size']} bytes")
        print(f"  {'counter':<24}{'qsim':>16}{'QEMU ' + result.qemu_version.split()[0]:>16}  {'difference':>10}")
        for key in COMPARED:
            diff = result.qsim[key] - result.qemu[key]
            note = "" if key in result.compared else "n/a: two caches"
            print(f"  {key:<24}{result.qsim[key]:>16}{result.qemu[key]:>16}  {note or (diff if diff else ''):>10}")
        print("match: misses and disk reads agree" if result.match else "MISMATCH: misses or disk reads differ")
    return 0 if result.match else 1
