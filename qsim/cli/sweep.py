"""``qsim sweep``: a trace over cluster sizes x extended_l2 x cache sizes, as one tidy table."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError
from ..units import parse_size
from .common import RawDefaultsHelp, print_json
from .replay import add_replay_options, emit_frame
from .scenario_args import reading_from_args, scenario_from_args

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
                       "print (or --save) one row per configuration. Several traces (or --save FOLDER/) make a "
                       "fleet sweep: one task per trace and geometry, on local processes or a Dask cluster, "
                       "resumable.", epilog=EXAMPLES, formatter_class=RawDefaultsHelp)
    add_replay_options(p, sweep=True)
    p.add_argument("--cluster-size", default="64k", metavar="LIST", help="cluster sizes, e.g. 16k,64k,128k,2M")
    p.add_argument("--extended-l2", default="off", metavar="LIST", help="on, off or on,off")
    p.add_argument("--scheduler", default=os.environ.get("QSIM_DASK_SCHEDULER"), metavar="tcp://HOST:8786",
                   help="run a fleet sweep's tasks on this Dask scheduler (default: $QSIM_DASK_SCHEDULER, else local "
                        "worker processes)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local worker processes for a fleet sweep (default and at most: every core)")
    p.set_defaults(run=run, kernels=True)


GRID_DESTS = frozenset({"cluster_size", "extended_l2"})  # what a sweep adds to the scenario options


def parse_on_off_list(text: str) -> tuple[bool, ...]:
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        if item not in ("on", "off"):
            raise UsageError(f"--extended-l2 {text[:60]}: expected on, off or on,off")
        values.append(item == "on")
    return tuple(dict.fromkeys(values))


def grid_from_args(args: argparse.Namespace):
    """The Grid the parsed options describe: the scenario, swept over --cluster-size x --extended-l2."""
    from ..scenario import Grid

    clusters = tuple(dict.fromkeys(parse_size(c, "--cluster-size") for c in args.cluster_size.split(",")
                                   if c.strip()))
    if not clusters:
        raise UsageError("--cluster-size: give at least one cluster size, e.g. 64k")
    return Grid(scenario_from_args(args, sweep=True), clusters, parse_on_off_list(args.extended_l2))


def is_fleet(args: argparse.Namespace) -> bool:
    """Several traces, a Dask scheduler or a folder to save into make a fleet sweep."""
    return len(args.trace) > 1 or bool(args.scheduler) or (args.save or "").endswith("/") or \
        (args.save is not None and os.path.isdir(args.save)) or not os.path.isfile(args.trace[0])


def run(args: argparse.Namespace) -> int:
    grid = grid_from_args(args)
    reading = reading_from_args(args)
    from ..fleet import check_scheduler_address, check_workers

    if args.scheduler:
        check_scheduler_address(args.scheduler)
    check_workers(args.workers)
    if is_fleet(args):
        return run_fleet(args, grid, reading)
    from ..sweep import sweep

    trace = reading.read(args.trace[0])
    if len(trace) == 0:
        raise UsageError(f"{args.trace[0]}: the trace has no requests")
    frame = sweep(trace, grid)
    for line in frame.attrs.get("skipped", []):
        print(f"qsim sweep: {line}", file=sys.stderr)
    emit_frame(frame, args)
    return 0


def run_fleet(args: argparse.Namespace, grid, reading) -> int:
    from ..fleet import expand_corpus, fleet_sweep, make_tasks, summarize
    from ..progress import progress_bar
    from ..safeio import atomic_output
    from ..tables import human_table

    if not args.save:
        raise UsageError("a fleet sweep needs --save FOLDER/ for its result set")
    paths = expand_corpus(args.trace)
    tasks, skipped = make_tasks(paths, grid, reading)
    for line in skipped:
        print(f"qsim sweep: {line}", file=sys.stderr)
    with progress_bar(total=len(tasks), unit="task", desc="fleet") as bar:
        frame, stats = fleet_sweep(tasks, args.save, args.scheduler, args.workers, progress=bar.update)
    summary = summarize(frame)
    os.makedirs(args.save, exist_ok=True)
    with atomic_output(os.path.join(args.save, "summary.csv"), binary=False) as f:
        summary.to_csv(f, index=False)
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
