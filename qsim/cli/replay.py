"""``qsim replay``: what QEMU's L2 cache does for a trace, one row per cache configuration."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from ..imageopts import parse_image_options
from ..progress import progress_bar
from ..replay import CACHE_MODES, replay
from ..tables import human_table, save_frame
from ..trace import OFFSET_POLICIES
from .common import RawDefaultsHelp, add_image_options, print_json, size_arg
from .trace import add_reader_options

EXAMPLES = """examples:
  qsim replay traces/fio-randread-4k.iolog.gz -o preallocation=metadata --l2-cache-size 64k,256k,1M,default
  qsim replay traces/fio-randwrite-4k.iolog.gz -o cluster_size=128k,extended_l2=on --output=json
  qsim replay trace.iolog --size 1T -o preallocation=metadata --l2-cache-size 64k..64M --save misses.csv
"""
IMAGE_KEYS = "cluster_size=64k, extended_l2=on|off, refcount_bits=16, preallocation=off|metadata, fill=0.3, " \
             "seed=0, backing=on|off"


def add_replay_options(p: argparse.ArgumentParser, geometry_in_options: bool = True, many: bool = False) -> None:
    """Options replay and sweep share: the trace, the disk, the cache, the output."""
    if many:
        p.add_argument("trace", metavar="TRACE", nargs="+", help="trace files, globs ('corpus/*.iolog.gz'), "
                       "directories or @list files; fio iolog (v2/v3), blkparse text, CSV or .npz; gzip is fine")
    else:
        p.add_argument("trace", metavar="TRACE", help="fio iolog (v2/v3), blkparse text, CSV or .npz; gzip is fine")
    add_reader_options(p)
    p.add_argument("--size", type=size_arg("--size"),
                   help="virtual disk size (default: the trace's largest end offset rounded up to a whole GiB)")
    p.add_argument("--image", metavar="IMG", help="replay against this real qcow2 image's allocation state and host "
                   "layout (read-only; it decides size and geometry)")
    p.add_argument("--backing-chain", action="store_true",
                   help="with --image: model the backing image's own L2 cache too (its default cache, as QEMU opens a "
                        "backing node); adds backing_l2_* columns")
    add_image_options(p, IMAGE_KEYS if geometry_in_options else IMAGE_KEYS.split(", ", 2)[2])
    p.add_argument("--l2-cache-size", default=None, metavar="LIST",
                   help="cache sizes: a list (64k,256k,1M,default), a range of powers of two (64k..64M) or N "
                        "log-spaced sizes (64k..64M:20); default: QEMU's default")
    p.add_argument("--l2-cache-entry-size", type=size_arg("--l2-cache-entry-size"), metavar="BYTES",
                   help="force the slice size (default: as QEMU picks it for each cache size)")
    p.add_argument("--cache-mode", choices=CACHE_MODES, default="writeback",
                   help="writeback (a VM's default) or writethrough (a flush after every write)")
    p.add_argument("--offset-policy", choices=OFFSET_POLICIES, default="error",
                   help="requests ending beyond --size: error (default), skip or wrap")
    p.add_argument("--qemu-version", default="7.2", metavar="X.Y", help="cache defaults of that QEMU (default 7.2)")
    p.add_argument("--output", choices=("human", "json", "csv"), default="human", help="printed format")
    p.add_argument("--save", metavar="FILE", help="also write the table: .csv, .json or .parquet" +
                   ("; a folder (ending in /) for a fleet sweep's Parquet result set" if many else ""))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="replay a trace against a qcow2 image model: L2 lookups, misses, write-backs, COW",
        description="Replay a trace the way QEMU's qcow2 driver would run it and report, per L2 cache "
        "configuration, lookups, hits, misses, disk reads, evictions, write-backs, copy-on-write and zero-fill "
        "bytes and metadata growth. Sizes as qemu-img writes them.",
        epilog=EXAMPLES, formatter_class=RawDefaultsHelp)
    add_replay_options(p)
    p.set_defaults(run=run)


def emit_frame(frame, args: argparse.Namespace) -> None:
    if args.save:
        save_frame(frame, args.save)
    if args.output == "json":
        print_json(frame.to_dict(orient="records"))
    elif args.output == "csv":
        frame.to_csv(sys.stdout, index=False)
    else:
        print(human_table(frame))
        if args.save:
            print(f"(all {len(frame.columns)} columns saved to {args.save})", file=sys.stderr)


def load_image_state(args: argparse.Namespace, options_text: str | None):
    """The real image named by --image, as an ImageState (None without --image); with --backing-chain, also
    sets ``args.backing_state``."""
    args.backing_state = None
    if not getattr(args, "image", None):
        if getattr(args, "backing_chain", False):
            raise UsageError("--backing-chain goes with --image")
        return None
    if options_text or args.size:
        raise UsageError("--image decides the size, geometry and allocation state; drop -o and --size")
    from ..image import image_from_qcow2
    from ..qcow2 import open_image

    img = open_image(args.image)
    for warning in img.warnings:
        print(f"qsim: warning: {args.image}: {warning}", file=sys.stderr)
    if getattr(args, "backing_chain", False):
        from ..image import backing_state

        args.backing_state = backing_state(img)
    return image_from_qcow2(img)


def run(args: argparse.Namespace) -> int:
    from ..traceio import iter_trace

    options = parse_image_options(args.image_options)
    image = load_image_state(args, args.image_options)
    size = args.size
    if image is None and size is None:  # one streaming pass for the largest end offset, then the replay
        from ..replay import virtual_size_for

        ends = [c.max_end_offset for c in iter_trace(args.trace, args.format, args.file, args.action)]
        size = virtual_size_for(max(ends, default=0))
    chunks = iter_trace(args.trace, args.format, args.file, args.action)
    with progress_bar(total=None, unit="req", desc="replay") as bar:
        result = replay(_non_empty(chunks, args.trace), size, options, image=image,
                               l2_cache_sizes=args.l2_cache_size, l2_cache_entry_size=args.l2_cache_entry_size,
                               cache_mode=args.cache_mode, offset_policy=args.offset_policy,
                               qemu_version=args.qemu_version, progress=bar.update, backing=args.backing_state)
    emit_frame(result.to_frame(), args)
    return 0


def _non_empty(chunks, path: str):
    """Pass the chunks through; a trace with no request at all is a usage error, said once it is known."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        yield chunk
    if total == 0:
        raise UsageError(f"{path}: the trace has no requests")
