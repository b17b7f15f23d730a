"""``qsim trace info|synth|convert``: look at traces, make synthetic ones, convert between formats."""

from __future__ import annotations

import argparse

from ..codes import MAX_SYNTH_REQUESTS as MAX_REQUESTS, OFFSET_POLICIES, TRACE_FORMATS as FORMATS
from ..errors import QsimError, UsageError
from ..safeio import check_output_path
from ..units import format_size, human_size, parse_number, parse_whole
from .common import RawDefaultsHelp, add_output, print_json, print_table, size_arg

EXAMPLES = """examples:
  qsim trace info traces/fio-randread-4k.iolog.gz
  qsim trace info /var/log/libvirt/qemu/vm1.log            # lists the BlockBackends; then --device 0x55...
  qsim trace convert alibaba_io_traces.csv.zst dev419.iolog.gz --volume 419
  qsim trace synth zipf.iolog.gz --pattern zipf:1.2 --size 100G --requests 1M --bs 4k --rw 70 --seed 1
  qsim trace synth mixed.csv --pattern hotspot:90/10 --size 20G --requests 100k --bs 4k/50:64k/50 --fsync 32
  qsim trace convert traces/fio-randread-4k.iolog.gz randread.npz
"""


VOLUME_WORD = {"qemu-log": "BlockBackend", "msr": "volume", "alibaba": "device", "tencent": "volume"}


def add_reader_options(parser: argparse.ArgumentParser) -> None:
    """How to read a trace file: the options every subcommand that loads a trace shares."""
    parser.add_argument("--format", choices=FORMATS, help="force the input format (default: detected from content)")
    parser.add_argument("--file", metavar="NAME", help="fio iolog naming several files: the one to keep")
    parser.add_argument("--action", default="Q", help="blkparse/blktrace: the action to keep (default Q, queued)")
    parser.add_argument("--device", metavar="PTR",
                        help="QEMU trace log: the BlockBackend to keep, by its blk pointer (trace info lists them)")
    parser.add_argument("--volume", metavar="ID", help="msr (HOST_DISK, e.g. web_1), alibaba (device_id), tencent "
                        "(VolumeID): the volume to keep (trace info lists them)")


def load_trace(args: argparse.Namespace, path: str | None = None):
    from .scenario_args import reading_from_args

    return reading_from_args(args).read(path or args.trace)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="inspect, synthesize and convert I/O traces",
                       description="Traces are fio iologs (v2/v3), blkparse text, CSV (op,offset,length[,time]), "
                       "qsim's binary .npz, QEMU trace logs (blk_co_preadv/pwritev), blktrace binary, CloudPhysics "
                       "vscsi, and the MSR Cambridge, Alibaba and Tencent CBS block traces; gzip and zstd are read "
                       "transparently.",
                       epilog=EXAMPLES, formatter_class=RawDefaultsHelp)
    tsub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    info = tsub.add_parser("info", help="counts, bytes, footprint and sizes of a trace", epilog=EXAMPLES,
                           formatter_class=RawDefaultsHelp)
    info.add_argument("trace", metavar="TRACE")
    add_reader_options(info)
    add_output(info)
    info.set_defaults(run=run_info)

    synth = tsub.add_parser("synth", help="generate a synthetic workload", epilog=EXAMPLES,
                            formatter_class=RawDefaultsHelp,
                            description="Write a seeded synthetic trace; OUT's suffix picks the format "
                            "(.iolog[.gz] fio iolog v3, .csv, .npz).")
    synth.add_argument("out", metavar="OUT")
    synth.add_argument("--pattern", default="uniform",
                       help="seq, uniform, zipf[:ALPHA] (default alpha 1.2) or hotspot[:IO/DISK] (default 90/10)")
    synth.add_argument("--size", required=True, type=size_arg("--size"), help="disk size the requests cover")
    synth.add_argument("--offset", type=size_arg("--offset"), default=0, help="start of the region (default 0)")
    synth.add_argument("--requests", required=True,
                       help=f"number of requests, e.g. 1M or 250k (k/M = 1000s here), at most {MAX_REQUESTS // 10**6}M")
    synth.add_argument("--bs", default="4k", help="block size: 4k, a range 4k-64k, or fio bssplit 4k/50:64k/50")
    synth.add_argument("--rw", type=_percent_arg, default=100.0, metavar="READ%",
                       help="share of reads in percent, like fio's rwmixread (default 100: reads only)")
    synth.add_argument("--align", type=size_arg("--align"), help="offset alignment (default: smallest block size)")
    synth.add_argument("--fsync", type=_whole_arg("--fsync"), default=0, metavar="N",
                       help="a flush after every N writes (fio's fsync; 0: none)")
    synth.add_argument("--seed", type=_whole_arg("--seed"), default=0, help="random seed, a whole number from 0")
    synth.add_argument("--fio-file", default="/dev/vda", help="file name written into an iolog (default /dev/vda)")
    synth.set_defaults(run=run_synth)

    convert = tsub.add_parser("convert", help="convert a trace between formats", epilog=EXAMPLES,
                              formatter_class=RawDefaultsHelp)
    convert.add_argument("trace", metavar="IN")
    convert.add_argument("out", metavar="OUT", help="output; its suffix picks the format (.iolog[.gz], .csv, .npz)")
    add_reader_options(convert)
    convert.add_argument("--size", type=size_arg("--size"), help="disk size, to apply --offset-policy")
    convert.add_argument("--offset-policy", choices=OFFSET_POLICIES, default="error",
                         help="requests ending beyond --size: error (default), skip or wrap")
    convert.add_argument("--fio-file", default="/dev/vda", help="file name written into an iolog (default /dev/vda)")
    convert.set_defaults(run=run_convert)


def parse_count(text: str) -> int:
    """A request count: 1000, 250k, 1M, 1.5M, 1e6 (decimal multiples: counts are not bytes), at most
    synth.MAX_REQUESTS."""
    s = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(s[-1:], 1)
    try:
        value = parse_number(s[:-1] if scale > 1 else s, "--requests") * scale
    except UsageError:
        raise UsageError(f"--requests {text[:40]!r}: expected a count such as 1000, 250k or 1M") from None
    if value < 0 or value != int(value):
        raise UsageError(f"--requests {text[:40]!r}: expected a whole, non-negative count")
    if value > MAX_REQUESTS:
        raise UsageError(f"--requests {text[:40]}: at most {MAX_REQUESTS:,} requests (qsim makes the trace in "
                         "memory); for more, write several traces")
    return int(value)


def _whole_arg(what: str, minimum: int = 0):
    def parse(text: str) -> int:
        try:
            return parse_whole(text, what, minimum)
        except UsageError as exc:  # argparse says which option already
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{what}: ")) from None

    parse.__name__ = "whole number"
    return parse


def _percent_arg(text: str) -> float:
    try:
        value = parse_number(text, "--rw")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--rw: ")) from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value:g} is not a share of reads from 0 to 100")
    return value


_percent_arg.__name__ = "percentage"


def run_info(args: argparse.Namespace) -> int:
    from ..replay import virtual_size_for
    from ..trace import trace_stats
    from ..traceio import detect_format
    from ..traceio.registry import survey

    fmt = args.format or detect_format(args.trace)
    volumes = survey(args.trace, fmt)
    if volumes is not None and len(volumes) > 1 and args.device is None and args.volume is None:
        return print_volumes(args, fmt, volumes)  # nothing chosen yet: what there is to choose from
    stats = trace_stats(load_trace(args))
    if volumes is not None:
        stats["volumes"] = volumes
    if args.output == "json":
        print_json(stats)
        return 0
    print(f"{stats['source']}: {stats['requests']} requests")
    print_table([
        ("reads", f"{stats['reads']}  ({human_size(stats['read_bytes'])})"),
        ("writes", f"{stats['writes']}  ({human_size(stats['write_bytes'])})"),
        ("discards", f"{stats['discards']}  ({human_size(stats['discard_bytes'])})"),
        ("flushes", f"{stats['flushes']}"),
        ("offsets", f"{stats['min_offset']} .. {stats['max_end_offset']}  "
                    f"(ends below {format_size(virtual_size_for(stats['max_end_offset']))})"),
        ("footprint", f"{stats['footprint_4k_blocks']} distinct 4k blocks "
                      f"({human_size(stats['footprint_4k_blocks'] * 4096)}), "
                      f"{stats['footprint_64k_clusters']} distinct 64k clusters"),
        ("unaligned", f"{100 * stats['unaligned_share']:.3g}% of requests not 4k-aligned"),
    ] + ([("duration", f"{stats['duration_s']:.3f} s")] if stats["duration_s"] is not None else []))
    if stats["size_histogram"]:
        print("  request sizes (rounded up to a power of two):")
        total = sum(stats["size_histogram"].values())
        for size, count in stats["size_histogram"].items():
            print(f"    {format_size(size):>6}  {count:>10}  {100 * count / total:5.1f}%")
    if volumes is not None:
        print_volume_table(fmt, volumes)
    return 0


def print_volumes(args: argparse.Namespace, fmt: str, volumes: list[dict]) -> int:
    from ..traceio.registry import SELECTOR

    option = SELECTOR[fmt]
    if args.output == "json":
        print_json({"source": args.trace, "format": fmt, "volumes": volumes})
        return 0
    print(f"{args.trace}: {fmt}, {len(volumes)} {VOLUME_WORD[fmt]}s; choose one with {option}")
    print_volume_table(fmt, volumes)
    return 0


def print_volume_table(fmt: str, volumes: list[dict]) -> None:
    from ..replay import virtual_size_for

    word = VOLUME_WORD[fmt]
    width = max([len(word)] + [len(str(v["volume"])) for v in volumes])
    print(f"  {word:<{width}}  {'requests':>10}  {'reads':>10}  {'writes':>10}  {'bytes':>10}  ends below  first line")
    for v in volumes:
        print(f"  {str(v['volume']):<{width}}  {v['requests']:>10}  {v['reads']:>10}  {v['writes']:>10}  "
              f"{human_size(v['bytes']):>10}  {format_size(virtual_size_for(v['max_end_offset'])):>10}  {v['first']}")



def run_synth(args: argparse.Namespace) -> int:
    from ..synth import synthesize
    from ..traceio import format_for_output, write_trace

    format_for_output(args.out)  # a name that says no format is refused before any work
    check_output_path(args.out)
    try:
        trace = synthesize(args.size, parse_count(args.requests), args.pattern, args.bs, args.rw / 100, args.align,
                           args.fsync, args.seed, args.offset)
    except MemoryError:
        raise QsimError(f"not enough memory for --requests {args.requests}; write fewer requests per trace") from None
    write_trace(trace, args.out, args.fio_file)
    print(f"wrote {len(trace)} requests to {args.out}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ..trace import apply_offset_policy
    from ..traceio import format_for_output, write_trace

    format_for_output(args.out)
    check_output_path(args.out)  # refused before reading a large input, and again when written
    trace = load_trace(args)
    if args.size is not None:
        trace = apply_offset_policy(trace, args.size, args.offset_policy)
    write_trace(trace, args.out, args.fio_file)
    print(f"wrote {len(trace)} requests to {args.out}")
    return 0
