"""``qsim plot``: the trade-off figures, from a table qsim saved (``qsim sweep --save``) or computed here."""

from __future__ import annotations

import argparse
import os

from ..errors import QsimError, UsageError
from ..sizing import coverage_table
from ..geometry import MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE
from ..safeio import check_output_path
from ..units import format_size, is_power_of_two, parse_size
from .common import RawDefaultsHelp, size_arg

EXAMPLES = """examples:
  qsim sweep traces/fio-randrw-mixed-fsync.iolog.gz --cluster-size 16k,64k,2M --extended-l2 off,on \\
      --l2-cache-size 16k..4M,default --save sweep.csv
  qsim plot mrc sweep.csv --save mrc.png
  qsim plot tradeoff sweep.csv --cache 1M --save tradeoff.svg
  qsim plot coverage --save coverage.png
  qsim plan results/ --budget 256M --save plan.json && qsim plot plan plan.json --save plan.png
"""
KINDS = ("mrc", "tradeoff", "coverage", "plan")
NEEDED = {
    "mrc": {"cluster_size", "extended_l2", "l2_cache_ram_bytes", "l2_cache_size_asked"},
    "tradeoff": {"cluster_size", "extended_l2", "l2_cache_bytes", "full_l2_cache_bytes", "cow_write_bytes",
                 "zero_fill_bytes", "metadata_overhead_bytes", "l2_misses", "l2_cache_size_asked"},
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="miss-ratio curve, cluster-size trade-off, coverage map or host plan, as PNG/SVG",
                       description="mrc and tradeoff read a table saved by 'qsim sweep --save'; plan reads the JSON "
                       "saved by 'qsim plan --save plan.json'; coverage needs no input.", epilog=EXAMPLES,
                       formatter_class=RawDefaultsHelp)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("table", nargs="?", metavar="TABLE",
                   help="a table saved by qsim sweep/replay (.csv .json .parquet); for plan, the plan's .json")
    p.add_argument("--save", required=True, metavar="FILE", help="output image: .png or .svg")
    p.add_argument("--metric", default="l2_misses", help="mrc: the y axis (l2_misses, l2_disk_reads, "
                   "metadata_read_bytes, l2_hit_ratio, l2_writebacks)")
    p.add_argument("--cache", type=size_arg("--cache"), help="tradeoff: the L2 cache size whose misses to show")
    p.add_argument("--disk-sizes", default="16G,64G,128G,256G,1T,4T,16T", help="coverage: disk sizes")
    p.add_argument("--cluster-sizes", default="16k,64k,128k,256k,512k,1M,2M", help="coverage: cluster sizes")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tables import load_frame

    from .. import plot

    if os.path.splitext(args.save)[1].lower() not in (".png", ".svg"):
        raise UsageError(f"--save {args.save}: plots are written as .png or .svg")
    check_output_path(args.save)  # before the work, and again when written
    if args.kind == "plan":
        fig = _plan_figure(plot, args.table)
    elif args.kind == "coverage":
        sizes = [parse_size(s, "--disk-sizes") for s in args.disk_sizes.split(",")]
        clusters = [parse_size(s, "--cluster-sizes") for s in args.cluster_sizes.split(",")]
        for cluster in clusters:
            if not (is_power_of_two(cluster) and MIN_CLUSTER_SIZE <= cluster <= MAX_CLUSTER_SIZE):
                raise UsageError(f"--cluster-sizes: {format_size(cluster)} is not a qcow2 cluster size (a power of "
                                 f"two from {format_size(MIN_CLUSTER_SIZE)} to {format_size(MAX_CLUSTER_SIZE)})")
        table = coverage_table(sizes, clusters)
        if table.empty:
            raise UsageError("--disk-sizes: QEMU refuses every disk size given with these cluster sizes "
                             "(too large for the L1 table)")
        fig = plot.coverage_map(table)
    else:
        if not args.table:
            raise UsageError(f"plot {args.kind} needs a TABLE saved by 'qsim sweep --save FILE.csv'")
        frame = load_frame(args.table)
        missing = NEEDED[args.kind] - set(frame.columns)
        if missing:
            raise QsimError(f"{args.table}: not a qsim sweep table (missing {', '.join(sorted(missing))})")
        if args.kind == "mrc":
            if args.metric not in frame.columns:
                raise UsageError(f"--metric {args.metric}: no such column in {args.table}")
            fig = plot.miss_ratio_curve(frame, args.metric)
        else:
            fig = plot.tradeoff(frame, args.cache)
    plot.save_figure(fig, args.save)
    print(f"wrote {args.save}")
    return 0


def _plan_figure(plot, path: str | None):
    """The plan figure from ``qsim plan --save plan.json``."""
    import json

    import pandas as pd

    from ..plan import OBJECTIVES

    if not path:
        raise UsageError("plot plan needs the JSON saved by 'qsim plan ... --save plan.json'")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise QsimError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QsimError(f"{path}: not a plan saved by 'qsim plan --save FILE.json' ({exc})") from None
    if not isinstance(saved, dict) or not saved.get("curve") or "baselines" not in saved:
        raise QsimError(f"{path}: not a plan saved by 'qsim plan --save FILE.json' (no curve)")
    objective = saved.get("objective", "misses")
    return plot.plan(pd.DataFrame(saved["curve"]), saved["baselines"].get("qemu_default"), saved.get("budget"),
                     ylabel="total " + OBJECTIVES.get(objective, objective))
