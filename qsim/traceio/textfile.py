"""Opening trace files: regular files only (never blocking on a FIFO), gzip and zstd read transparently, the text
handed out in blocks of whole lines, and clear one-line errors for whatever a file can be instead of a trace.

Everything a reader learns about a hostile file becomes a QsimError naming the file: a missing file, a folder, a
FIFO or device, a /proc file, a truncated or corrupt gzip or zstd stream, a line longer than ``MAX_LINE_BYTES``,
binary data.
Messages quote at most ``QUOTE_CHARS`` characters of a bad field (see ``shorten``).
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import re
import stat
import zlib
from collections.abc import Iterator
from typing import IO, NamedTuple

import numpy as np
from numba import njit

from ..errors import QsimError
from . import compressed

BLOCK_BYTES = 1 << 23  # text handed to a parser at a time (decompressed): bounded memory whatever the file's size
MAX_LINE_BYTES = 1 << 20  # no trace format has lines anywhere near this long
QUOTE_CHARS = 60
MAX_INT64 = 2**63 - 1  # QEMU's limit for a disk (INT64_MAX): every request ends at or below it
PSEUDO_FILESYSTEMS = ("/proc/", "/sys/")


def shorten(value: str, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of a field for an error message, cut to ``limit`` characters (a 10 MB field is not echoed)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_readable(path: str) -> None:
    """Refuse, with one line, anything that is not a readable regular trace file (without opening it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QsimError(f"{path}: no such file") from None
    except OSError as exc:
        raise QsimError(f"{path}: cannot read ({exc.strerror or exc})") from None
    _check_mode(path, st)
    if not os.access(path, os.R_OK):
        raise QsimError(f"{path}: permission denied")


def _check_mode(path: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise QsimError(f"{path}: is a directory, not a trace file")
    if not stat.S_ISREG(st.st_mode):
        raise QsimError(f"{path}: is not a regular file (a FIFO, device or socket); qsim reads traces from files")
    real = os.path.realpath(path)
    if real.startswith(PSEUDO_FILESYSTEMS) or real in ("/proc", "/sys"):
        raise QsimError(f"{path}: is a {real.split('/')[1]} file of the kernel, not a trace file")


def _open_regular(path: str) -> IO[bytes]:
    """Open without ever blocking (O_NONBLOCK: a FIFO swapped in after the check cannot hang us), then make sure
    what was opened is a regular file."""
    check_readable(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise QsimError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        _check_mode(path, os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


class _Reader(io.RawIOBase):
    """A file's bytes, decoded if gzip or zstd (``compressed.decoder``); read errors become QsimError naming the
    file. An uncompressed file can seek (capture reads a log from where it was when the capture began)."""

    def __init__(self, path: str):
        self.path = path
        self.raw = _open_regular(path)
        head = self._guard(self.raw.read, 4)
        self.raw.seek(0)
        try:
            self.stream = compressed.decoder(path, self.raw, head)
        except BaseException:
            self.raw.close()
            raise
        self.compressed = self.stream is not self.raw

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except EOFError:
            raise QsimError(f"{self.path}: the gzip data is truncated (the file ends mid-stream)") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise QsimError(f"{self.path}: damaged gzip data ({exc})") from None
        except MemoryError:
            raise QsimError(f"{self.path}: not enough memory to read it") from None
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise QsimError(f"{self.path}: is a directory, not a trace file") from None
            raise QsimError(f"{self.path}: cannot read ({exc.strerror or exc})") from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return not self.compressed

    def seek(self, offset: int, whence: int = 0) -> int:
        if self.compressed:
            raise io.UnsupportedOperation("seek in a compressed trace")
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()

    def readinto(self, buffer) -> int:
        return self._guard(self.stream.readinto, buffer)

    def read(self, size: int = -1) -> bytes:
        return self._guard(self.stream.read, size)

    def close(self) -> None:
        try:
            if self.stream is not self.raw:
                self.stream.close()
        finally:
            self.raw.close()
            super().close()


def open_binary(path: str) -> IO[bytes]:
    """The file's bytes, decompressed if it is gzip or zstd (by content, not by name); errors are QsimError. Every
    trace reader opens its files here."""
    return _Reader(path)  # type: ignore[return-value]


def head_lines(path: str, count: int = 5) -> list[str]:
    """The first few lines as text (for format detection and error messages); binary garbage raises QsimError."""
    with open_binary(path) as f:
        data = f.read(64 * 1024)
    if b"\x00" in data[:4096] and not data.startswith(b"\x93NUMPY") and not data.startswith(b"PK"):
        raise QsimError(f"{path}: binary data, not a trace (expected a fio iolog, blkparse text, CSV or .npz)")
    text = data.decode("utf-8", errors="replace")
    return text.splitlines()[:count]


class Block(NamedTuple):
    """Whole lines of a text: ``data`` (uint8, each line ending in ``\\n`` except perhaps the file's last),
    the number of its first line, and how many ``\\n`` it holds."""

    first_line: int
    data: np.ndarray
    newlines: int


def line_blocks(path: str, block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """The whole text in Blocks. ``data`` is a view of a buffer reused for the next block: use it before asking
    for the next one. A line longer than MAX_LINE_BYTES is an error naming it."""
    buffer = bytearray(block_bytes + MAX_LINE_BYTES)
    view = memoryview(buffer)
    whole = np.frombuffer(buffer, dtype=np.uint8)
    line = 1
    kept = 0  # bytes of an unfinished line carried at the buffer's start
    with open_binary(path) as f:
        while True:
            got = f.readinto(view[kept:kept + block_bytes])
            end = kept + got
            if got == 0:
                if kept:
                    yield Block(line, whole[:kept], 0)
                return
            cut = buffer.rfind(b"\n", kept, end) + 1
            if cut == 0:
                kept = end
                if kept > MAX_LINE_BYTES:
                    raise QsimError(f"{path}: line {line}: longer than {MAX_LINE_BYTES >> 20} MiB, not a trace line")
                continue
            newlines = _newlines(whole[:cut])
            yield Block(line, whole[:cut], newlines)
            line += newlines
            rest = end - cut
            if rest > MAX_LINE_BYTES:
                raise QsimError(f"{path}: line {line}: longer than {MAX_LINE_BYTES >> 20} MiB, not a trace line")
            buffer[:rest] = buffer[cut:end]
            kept = rest


@njit(cache=True, nogil=True)
def _newlines(data: np.ndarray) -> int:
    count = 0
    for c in data:
        count += c == 10
    return count


def skip_first_line(block: Block) -> Block:
    """The block without its first line (a header)."""
    if not block.newlines:
        return Block(block.first_line + 1, block.data[:0], 0)
    cut = block.data[:MAX_LINE_BYTES + 1].tobytes().find(b"\n") + 1
    return Block(block.first_line + 1, block.data[cut:], block.newlines - 1)


class Scratch:
    """Output arrays for parsing a block, kept from block to block (fresh memory costs page faults on every
    block) and grown when a block has more lines. Columns: name=(dtype, shape after the line axis)."""

    def __init__(self, **columns: tuple):
        self.columns = columns
        self.arrays: dict[str, np.ndarray] = {}
        self.capacity = -1

    def get(self, lines: int) -> dict[str, np.ndarray]:
        if lines > self.capacity:
            self.capacity = lines
            self.arrays = {name: np.empty((lines, *shape), dtype) for name, (dtype, shape) in self.columns.items()}
        return self.arrays


def line_text(block: np.ndarray, index: int) -> str:
    """Line ``index`` (0-based) of a block, decoded for a message (without its line ending)."""
    data = memoryview(block)
    start = 0
    for _ in range(index):
        start = _find_newline(block, start) + 1
    stop = _find_newline(block, start)
    text = bytes(data[start:] if stop < 0 else data[start:stop])
    return text.decode("utf-8", errors="replace").removesuffix("\r")


@njit(cache=True, nogil=True)
def _find_newline(data: np.ndarray, start: int) -> int:
    for i in range(start, data.size):
        if data[i] == 10:
            return i
    return -1


_SPACES = re.compile(r"[ \t]+")


def split_fields(text: str) -> list[str]:
    """Fields separated by spaces or tabs (only those: the fast parsers split exactly there)."""
    text = text.strip(" \t")
    return _SPACES.split(text) if text else []


def is_ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def whole_number(text: str) -> int | None:
    """ASCII digits as an int up to INT64_MAX, else None (and never int() of a 10 MB string)."""
    if not is_ascii_digits(text) or len(text.lstrip("0")) > 19:
        return None
    value = int(text)
    return value if value <= MAX_INT64 else None


def bare(value: str) -> str:
    """A number as it was written, for a message; a long one is cut like ``shorten``."""
    return value if len(value) <= QUOTE_CHARS else shorten(value)


def text_lines(path: str):
    """Iterate (line number, text) over the whole file: only for slow paths that explain a parse error."""
    with open_binary(path) as f:
        for number, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="\n"),
                                     start=1):
            yield number, raw.rstrip("\n").removesuffix("\r")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def gather(path: str, chunks, nbytes=lambda chunk: chunk.nbytes) -> list:
    """The chunks in a list, refusing (before the machine runs out) a trace that needs more memory than is free:
    joining them needs twice what they hold."""
    parts, held, free = [], 0, available_memory()
    for chunk in chunks:
        held += nbytes(chunk)
        if free is not None and 2 * held > free:
            raise QsimError(f"{path}: the trace needs more memory than is free ({held >> 20} MiB after "
                            f"{len(parts)} blocks); 'qsim replay --size' streams it instead")
        parts.append(chunk)
    return parts
