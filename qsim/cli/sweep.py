"""``qsim sweep``: a trace over cluster sizes x extended_l2 x cache sizes, as one tidy table."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError
from ..imageopts import parse_image_options
from ..sweep import sweep
from ..units import parse_size
from .common import RawDefaultsHelp, print_json
from .replay import add_replay_options, emit_frame, load_image_state

EXAMPLES = """examples:
  qsim sweep traces/fio-randrw-mixed-fsync.iolog.gz --cluster-size 16k,64k,128k,2M --extended-l2 on,off \\
      --l2-cache-size 64k..16M --save sweep.csv
  qsim sweep traces/fio-randread-4k.iolog.gz -o preallocation=metadata --l2-cache-size 16k..4M:12 --output=csv
  qsim sweep 'corpus/*.iolog.gz' --cluster-size 64k,2M --extended-l2 on,off --save results/     # a fleet
  qsim sweep corpus/ --save results/ --scheduler tcp://scheduler:8786                          # on Dask
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="replay over cluster sizes x extended_l2 x cache sizes into one table",
                       description="Replay one trace for every cluster size x extended_l2 x L2 cache size and "
                       "print (or --save) one row per configuration.", epilog=EXAMPLES,
                       formatter_class=RawDefaultsHelp)
    add_replay_options(p, geometry_in_options=False, many=True)
    p.add_argument("--cluster-size", default="64k", metavar="LIST", help="cluster sizes, e.g. 16k,64k,128k,2M")
    p.add_argument("--extended-l2", default="off", metavar="LIST", help="on, off or on,off")
    p.add_argument("--scheduler", default=os.environ.get("QSIM_DASK_SCHEDULER"), metavar="tcp://HOST:8786",
                   help="run a fleet sweep's tasks on this Dask scheduler (default: $QSIM_DASK_SCHEDULER, else local "
                        "worker processes)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local worker processes for a fleet sweep (default: every core)")
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

    options = parse_image_options(args.image_options, ("refcount_bits", "preallocation", "fill", "seed", "backing"))
    clusters = [parse_size(c, "--cluster-size") for c in args.cluster_size.split(",") if c.strip()]
    extended = parse_on_off_list(args.extended_l2)
    fleet = len(args.trace) > 1 or args.scheduler or (args.save or "").endswith("/") or \
        (args.save is not None and os.path.isdir(args.save)) or not os.path.isfile(args.trace[0])
    if fleet:
        return run_fleet(args, options, clusters, extended)
    args.trace = args.trace[0]
    image = load_image_state(args, args.image_options)
    if image is not None and (args.cluster_size != "64k" or args.extended_l2 != "off"):
        raise UsageError("--image fixes the cluster size and extended_l2; sweep only cache sizes with it")
    trace = load_trace(args)
    if len(trace) == 0:
        raise UsageError(f"{args.trace}: the trace has no requests")
    frame = sweep(trace, clusters, extended, args.l2_cache_size, options, args.size, args.l2_cache_entry_size,
                  args.cache_mode, args.offset_policy, args.qemu_version, image=image)
    emit_frame(frame, args)
    return 0


def run_fleet(args: argparse.Namespace, options, clusters, extended) -> int:
    from ..fleet import expand_corpus, fleet_sweep, plan, summarize
    from ..progress import progress_bar
    from ..tables import human_table

    if not args.save:
        raise UsageError("a fleet sweep needs --save FOLDER/ for its result set")
    paths = expand_corpus(args.trace)
    tasks = plan(paths, clusters, extended, args.l2_cache_size or "default", options, args.l2_cache_entry_size,
                 args.cache_mode, args.size, args.offset_policy)
    with progress_bar(total=len(tasks), unit="task", desc="fleet") as bar:
        frame, stats = fleet_sweep(tasks, args.save, args.scheduler, args.workers, progress=bar.update)
    summary = summarize(frame)
    os.makedirs(args.save, exist_ok=True)
    summary.to_csv(os.path.join(args.save, "summary.csv"), index=False)
    if args.output == "json":
        print_json({"summary": summary.to_dict(orient="records"), "run": stats})
    elif args.output == "csv":
        summary.to_csv(sys.stdout, index=False)
    else:
        print(human_table(summary, list(summary.columns)))
    speed = f"{stats['requests_per_second']:,.0f} requests/s" if stats["ran"] else "nothing left to run"
    print(f"{len(paths)} traces, {stats['tasks']} tasks ({stats['skipped']} already done) in {stats['seconds']:.1f} s: "
          f"{speed}; results in {args.save}", file=sys.stderr)
    return 0
