"""``qsim``: the command line, a thin layer over the library (one module per subcommand)."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import QsimError
from . import capture, inspect, measure, plan, plot, replay, size, sweep, trace, validate

SUBCOMMANDS = [size, measure, inspect, trace, replay, sweep, validate, plan, plot, capture]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsim",
        description="How much L2 cache does this qcow2 disk need, and what does each cluster size / extended_l2 "
        "choice cost in RAM, extra I/O and metadata? Sizes are written as qemu-img writes them: 512, 64k, 32M, 4T.",
        epilog="Run 'qsim COMMAND --help' for examples. Exit status: 0 success, 1 failure or mismatch, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"qsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = " ".join(filter(None, (args.command, getattr(args, "trace_command", None))))
    try:
        return int(args.run(args) or 0)
    except QsimError as exc:
        print(f"qsim {name}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"qsim {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
