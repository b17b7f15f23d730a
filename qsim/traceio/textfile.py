"""Opening trace files: gzip read transparently, clear errors for missing files, directories and binary garbage."""

from __future__ import annotations

import gzip
import io
import os
from typing import IO

from ..errors import QsimError

GZIP_MAGIC = b"\x1f\x8b"


def check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise QsimError(f"{path}: no such file")
    if os.path.isdir(path):
        raise QsimError(f"{path}: is a directory, not a trace file")
    if not os.access(path, os.R_OK):
        raise QsimError(f"{path}: permission denied")


def open_binary(path: str) -> IO[bytes]:
    """The file's bytes, decompressed if it is gzip (by content, not by name)."""
    check_readable(path)
    raw = open(path, "rb")
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    raw.seek(0)
    return raw


def head_lines(path: str, count: int = 5) -> list[str]:
    """The first few lines as text (for format detection and error messages); binary garbage raises QsimError."""
    with open_binary(path) as f:
        try:
            data = f.read(64 * 1024)
        except (OSError, EOFError) as exc:
            raise QsimError(f"{path}: cannot read ({exc})") from None
    if b"\x00" in data[:4096] and not data.startswith(b"\x93NUMPY") and not data.startswith(b"PK"):
        raise QsimError(f"{path}: binary data, not a trace (expected a fio iolog, blkparse text, CSV or .npz)")
    text = data.decode("utf-8", errors="replace")
    return text.splitlines()[:count]


def text_lines(path: str):
    """Iterate (line number, text) over the whole file: only for the slow path that explains a parse error."""
    with open_binary(path) as f:
        for number, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), start=1):
            yield number, raw.rstrip("\n")
