"""Pieces every subcommand shares: size arguments, ``-o``, ``--output``, printing records."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from ..errors import UsageError
from ..units import parse_size


class RawDefaultsHelp(argparse.RawDescriptionHelpFormatter):
    """Keep the examples in epilogs laid out as written."""


def size_arg(what: str) -> Callable[[str], int]:
    """An argparse type that reads a qemu-img size and names the option in its error."""

    def parse(text: str) -> int:
        try:
            return parse_size(text, what)
        except UsageError as exc:  # argparse turns this into a usage line and exit status 2
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "size"
    return parse


def add_output(parser: argparse.ArgumentParser, choices: tuple[str, ...] = ("human", "json")) -> None:
    parser.add_argument(
        "--output",
        choices=choices,
        default="human",
        help="printed format: " + ", ".join(choices) + " (JSON and CSV go to stdout, messages to stderr)",
    )


def add_image_options(parser: argparse.ArgumentParser, keys: str) -> None:
    parser.add_argument("-o", dest="image_options", metavar="OPTIONS", default=None, help=f"image options: {keys}")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(rows: list[tuple[str, str]], indent: str = "  ") -> None:
    """Two aligned columns: label, value."""
    width = max((len(label) for label, _ in rows), default=0)
    for label, value in rows:
        print(f"{indent}{label.ljust(width)}  {value}")
