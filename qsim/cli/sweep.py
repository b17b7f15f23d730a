"""``qsim sweep``: a trace over cluster sizes x extended_l2 x cache sizes, as one tidy table."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ..imageopts import parse_image_options
from ..sweep import sweep
from ..units import parse_size
from .common import RawDefaultsHelp
from .replay import add_replay_options, emit_frame

EXAMPLES = """examples:
  qsim sweep traces/fio-randrw-mixed-fsync.iolog.gz --cluster-size 16k,64k,128k,2M --extended-l2 on,off \\
      --l2-cache-size 64k..16M --save sweep.csv
  qsim sweep traces/fio-randread-4k.iolog.gz -o preallocation=metadata --l2-cache-size 16k..4M:12 --output=csv
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="replay over cluster sizes x extended_l2 x cache sizes into one table",
                       description="Replay one trace for every cluster size x extended_l2 x L2 cache size and "
                       "print (or --save) one row per configuration.", epilog=EXAMPLES,
                       formatter_class=RawDefaultsHelp)
    add_replay_options(p, geometry_in_options=False)
    p.add_argument("--cluster-size", default="64k", metavar="LIST", help="cluster sizes, e.g. 16k,64k,128k,2M")
    p.add_argument("--extended-l2", default="off", metavar="LIST", help="on, off or on,off")
    p.set_defaults(run=run)


def parse_on_off_list(text: str) -> list[bool]:
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        if item not in ("on", "off"):
            raise UsageError(f"--extended-l2 {text}: expected on, off or on,off")
        values.append(item == "on")
    return values


def run(args: argparse.Namespace) -> int:
    from .trace import load_trace

    from .replay import load_image_state

    options = parse_image_options(args.image_options, ("refcount_bits", "preallocation", "fill", "seed", "backing"))
    image = load_image_state(args, args.image_options)
    if image is not None and (args.cluster_size != "64k" or args.extended_l2 != "off"):
        raise UsageError("--image fixes the cluster size and extended_l2; sweep only cache sizes with it")
    clusters = [parse_size(c, "--cluster-size") for c in args.cluster_size.split(",") if c.strip()]
    trace = load_trace(args)
    if len(trace) == 0:
        raise UsageError(f"{args.trace}: the trace has no requests")
    frame = sweep(trace, clusters, parse_on_off_list(args.extended_l2), args.l2_cache_size, options, args.size,
                  args.l2_cache_entry_size, args.cache_mode, args.offset_policy, args.qemu_version, image=image)
    emit_frame(frame, args)
    return 0
