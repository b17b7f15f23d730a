"""``qsim``: the command line, a thin layer over the library (one module per subcommand)."""

from __future__ import annotations

import argparse
import gc
import os
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


def main(argv: list[str] | None = None, settle=None) -> int:
    """Run one command; ``settle(args)``, when given, runs after the arguments are parsed and before the command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = " ".join(filter(None, (args.command, getattr(args, "trace_command", None))))
    try:
        if settle is not None:
            settle(args)
        return int(args.run(args) or 0)
    except QsimError as exc:
        print(f"qsim {name}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"qsim {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    """The process entry point (the ``qsim`` command, ``python -m qsim``): ``main`` with start-up tuned for one job.
    qsim never calls BLAS, so OpenBLAS gets no thread pool (its threads only took the second core at start-up)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    gc.disable()  # (until _settled)
    sys.exit(main(settle=_settled))


def _settled(args: argparse.Namespace) -> None:
    """Start-up makes a few hundred thousand objects that live as long as the process: the modules and, as the
    first compiled kernel loads, numba's typing registries. The garbage collector stays off while they are made
    (otherwise it walks them again and again: about 0.3 s), numba's registries load now for a command that
    compiles (``kernels``: replay, sweep, validate), and then every object so far is left out of later
    collections, the one at exit included."""
    if getattr(args, "kernels", False):
        import numpy as np

        from ..bitops import popcount64

        popcount64(np.int64(0))  # the first cached kernel: numba's typing and lowering registries load with it
    gc.freeze()
    gc.enable()


if __name__ == "__main__":  # pragma: no cover
    entry()
