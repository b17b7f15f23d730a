"""``qsim replay``: what QEMU's L2 cache does for a trace, one row per cache configuration."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from .common import RawDefaultsHelp, print_json
from .scenario_args import add_scenario_options, reading_from_args, scenario_from_args
from .trace import add_reader_options

EXAMPLES = """examples:
  qsim replay traces/fio-randread-4k.iolog.gz -o preallocation=metadata --l2-cache-size 64k,256k,1M,default
  qsim replay traces/fio-randwrite-4k.iolog.gz -o cluster_size=128k,extended_l2=on --output=json
  qsim replay trace.iolog --size 1T -o preallocation=metadata --l2-cache-size 64k..64M --save misses.csv
"""


def add_replay_options(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Options replay and sweep share: the trace and how to read it, the scenario, the output."""
    if sweep:
        p.add_argument("trace", metavar="TRACE", nargs="+", help="trace files, globs ('corpus/*.iolog.gz'), "
                       "directories or @list files; fio iolog (v2/v3), blkparse text, CSV or .npz; gzip or zstd is "
                       "fine")
    else:
        p.add_argument("trace", metavar="TRACE", help="fio iolog (v2/v3), blkparse text, CSV or .npz; gzip or zstd "
                       "is fine")
    add_reader_options(p)
    add_scenario_options(p, sweep=sweep)
    p.add_argument("--output", choices=("human", "json", "csv"), default="human", help="printed format")
    p.add_argument("--save", metavar="FILE", help="also write the table: .csv, .json or .parquet" +
                   ("; a folder (ending in /) for a fleet sweep's Parquet result set" if sweep else ""))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="replay a trace against a qcow2 image model: L2 lookups, misses, write-backs, COW",
        description="Replay a trace the way QEMU's qcow2 driver would run it and report, per L2 cache "
        "configuration, lookups, hits, misses, disk reads, evictions, write-backs, copy-on-write and zero-fill "
        "bytes and metadata growth. Sizes as qemu-img writes them.",
        epilog=EXAMPLES, formatter_class=RawDefaultsHelp)
    add_replay_options(p)
    p.set_defaults(run=run, kernels=True)


def emit_frame(frame, args: argparse.Namespace) -> None:
    from ..tables import human_table, save_frame

    for note in frame.attrs.get("notes", []):
        print(f"qsim: warning: {note}", file=sys.stderr)
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


def run(args: argparse.Namespace) -> int:
    from ..progress import progress_bar
    from ..replay import replay, virtual_size_for
    from ..traceio.prefetch import prefetched

    reading = reading_from_args(args)
    size, chunks = None, None
    if not args.image and args.size is None:  # the synthetic image's size is the trace's end: known once it is read
        end, chunks = sized_chunks(reading, args.trace)
        size = virtual_size_for(end)
    scenario = scenario_from_args(args, virtual_size=size)
    with progress_bar(total=None, unit="req", desc="replay") as bar:
        stream = chunks or prefetched(reading.chunks(args.trace))  # (read in a thread, ahead of the replay)
        result = replay(_non_empty(stream, args.trace), scenario, progress=bar.update)
    emit_rows(result, args)
    return 0


def emit_rows(result, args: argparse.Namespace) -> None:
    """Print a replay's rows: CSV and JSON of plain rows written directly (as pandas writes them: the tests
    compare), sparing the command pandas' import; anything else through ``emit_frame``."""
    rows = result.rows
    if args.save or args.output == "human" or not plain_rows(rows):
        emit_frame(result.to_frame(), args)
        return
    for note in result.notes:
        print(f"qsim: warning: {note}", file=sys.stderr)
    if args.output == "json":
        print_json(rows)
        return
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(rows[0])
    writer.writerows([["" if v is None else v for v in row.values()] for row in rows])


def plain_rows(rows: list[dict]) -> bool:
    """Rows with the same columns, each column all of one Python type (bool, int, float, str) or all None: those
    that pandas writes exactly as the csv and json modules do."""
    if not rows or any(list(row) != list(rows[0]) for row in rows):
        return False
    for name in rows[0]:
        kinds = {type(row[name]) for row in rows}
        if len(kinds) != 1 or not kinds <= {bool, int, float, str, type(None)}:
            return False
    return True


def sized_chunks(reading, path: str, budget_bytes: int | None = None) -> tuple[int, list | None]:
    """(largest end offset, the chunks) from one pass over the trace, keeping the chunks while they fit in
    ``budget_bytes`` (a quarter of the free memory by default); (end, None) for a larger trace, which is then read a
    second time instead of held."""
    from ..traceio.textfile import available_memory

    if budget_bytes is None:
        free = available_memory()
        budget_bytes = free // 4 if free is not None else 1 << 30
    kept: list | None = []
    held = end = 0
    for chunk in reading.chunks(path):
        end = max(end, chunk.max_end_offset)
        if kept is not None:
            held += chunk.nbytes
            if held <= budget_bytes:
                kept.append(chunk)
            else:
                kept = None  # (dropped at once: the rest of the pass holds one chunk at a time)
    return end, kept


def _non_empty(chunks, path: str):
    """Pass the chunks through; a trace with no request at all is a usage error, said once it is known."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        yield chunk
    if total == 0:
        raise UsageError(f"{path}: the trace has no requests")
