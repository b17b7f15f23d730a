"""``qsim validate``: run a trace through real QEMU and through qsim, side by side."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .common import RawDefaultsHelp, print_json
from .scenario_args import add_scenario_options, reading_from_args, scenario_from_args
from .trace import add_reader_options

EXAMPLES = """examples:
  qsim validate traces/fio-randrw-mixed-fsync.iolog.gz -o preallocation=metadata --l2-cache-size 64k
  qsim validate traces/fio-randwrite-4k.iolog.gz -o cluster_size=128k,extended_l2=on --cache-mode writethrough
  qsim validate trims.iolog --discard unmap --qemu-io /opt/qemu-10.0/usr/bin/qemu-io
exit status: 0 every counter agrees, 1 one differs, 2 QEMU is not installed (apt-get install -y qemu-utils)
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="replay a trace in real qemu-io and in qsim; compare the counters",
                       description="Builds the image with qemu-img in a scratch directory (removed afterwards, even "
                       "on Ctrl-C), replays the trace through qemu-io with qcow2 cache tracing, runs qsim on the "
                       "same input and prints both side by side.", epilog=EXAMPLES,
                       formatter_class=RawDefaultsHelp)
    p.add_argument("trace", metavar="TRACE")
    add_reader_options(p)
    add_scenario_options(p, one_cache=True)
    p.add_argument("--qemu-io", metavar="PATH", default=None,
                   help="the qemu-io to compare with (qemu-img from the same folder makes the image); default "
                        "$QSIM_QEMU_IO, else the one on PATH")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(run=run, kernels=True)


def run(args: argparse.Namespace) -> int:
    from ..progress import progress_bar
    from ..qemu import describe, find_tool
    from ..validate import validate

    find_tool("qemu-io", args.qemu_io)
    find_tool("qemu-img", args.qemu_io)
    scenario = scenario_from_args(args)
    trace = reading_from_args(args).read(args.trace)
    if len(trace) == 0:
        raise UsageError(f"{args.trace}: the trace has no requests")
    with progress_bar(total=len(trace), unit="req", desc="qemu-io") as bar:
        result = validate(trace, scenario, progress=bar.update, qemu_io=args.qemu_io)
    if args.output == "json":
        print_json(result.to_dict())
    else:
        where = args.image if args.image else describe(scenario.image.options, result.virtual_size)
        discard = f"discard={scenario.discard}" + (",discard-no-unref=on" if scenario.discard_no_unref else "")
        print(f"{args.trace}: {result.requests} requests on {where}, {scenario.cache_mode}, {discard}, "
              f"L2 cache {result.qsim['l2_cache_entries']} x {result.qsim['l2_cache_entry_size']} bytes")
        print("  cache cleaning off on both sides: qemu-io never runs the cleaner (its timer is on the virtual "
              "clock, which only a running VM starts)")
        print(f"  {'counter':<24}{'qsim':>16}{'QEMU ' + result.qemu_version.split()[0]:>16}  {'difference':>10}")
        for key in result.qsim:
            if key in ("l2_cache_entries", "l2_cache_entry_size"):
                continue
            diff = result.qsim[key] - result.qemu[key]
            note = "" if key in result.compared else "n/a: two caches"
            print(f"  {key:<24}{result.qsim[key]:>16}{result.qemu[key]:>16}  {note or (diff if diff else ''):>10}")
        if result.match:
            print(f"match: all {len(result.compared)} counters agree")
        else:
            print(f"MISMATCH: {', '.join(result.differences)} differ{'s' if len(result.differences) == 1 else ''}")
    return 0 if result.match else 1
