"""Reading and writing traces in every format qsim knows, with the format detected from the content."""

from __future__ import annotations

from ..errors import QsimError
from ..trace import Trace
from .blkparse import iter_blkparse, looks_like_blkparse
from .csvfmt import iter_csv_trace, write_csv_trace
from .iolog import HEADERS, iter_iolog, read_iolog, write_iolog
from .npz import read_npz_trace, write_npz_trace
from .textfile import check_readable, gather, head_lines
from . import registry

from ..codes import TRACE_FORMATS as FORMATS

assert set(registry.FORMATS) <= set(FORMATS)  # the CLI's --format choices name every reader


def detect_format(path: str) -> str:
    found = registry.detect_first(path)  # binary, zstd, blktrace per-CPU sets
    if found:
        return found
    check_readable(path)
    lines = head_lines(path, 20)
    if not lines:
        raise QsimError(f"{path}: empty file, not a trace")
    if lines[0].startswith("PK"):
        return "npz"
    if lines[0].strip() in HEADERS:
        return "iolog"
    if lines[0].strip().lower().replace(" ", "").startswith("op,"):
        return "csv"
    if looks_like_blkparse(lines):
        return "blkparse"
    found = registry.detect_last(path, lines)  # headerless public traces, QEMU logs
    if found:
        return found
    raise QsimError(f"{path}: line 1: unknown trace format {lines[0][:60]!r} (expected a fio iolog header "
                    "'fio version 3 iolog', a CSV header 'op,offset,length', blkparse text or a qsim .npz; "
                    "force one with --format)")


def read_trace(path: str, format: str | None = None, file: str | None = None, action: str = "Q",
               device: str | None = None, volume: str | None = None) -> Trace:
    """Load a trace; ``format`` forces one of FORMATS, ``file`` picks a file in a multi-file iolog, ``action`` the
    blkparse/blktrace action kept, ``device`` a BlockBackend of a QEMU log, ``volume`` a volume of an msr, alibaba
    or tencent trace."""
    fmt = format or detect_format(path)
    if fmt in registry.FORMATS:
        return registry.read_formats(path, fmt, action, device, volume)
    registry.check_selection(path, fmt, device, volume)
    check_readable(path)
    if fmt == "iolog":
        return read_iolog(path, file)
    if fmt == "npz":
        return read_npz_trace(path)
    return _whole(path, _streams(path, fmt, file, action))


def _streams(path: str, fmt: str, file: str | None, action: str):
    if fmt == "iolog":
        return iter_iolog(path, file)
    if fmt == "csv":
        return iter_csv_trace(path)
    if fmt == "blkparse":
        return iter_blkparse(path, action)
    if fmt == "npz":
        return iter([read_npz_trace(path)])
    raise QsimError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}", 2)


def _whole(path: str, chunks) -> Trace:
    from ..trace import concat

    parts = gather(path, chunks)
    return concat(parts) if parts else Trace.from_arrays([], [], [], None, path)


def iter_trace(path: str, format: str | None = None, file: str | None = None, action: str = "Q",
               chunk_requests: int = 1 << 21, device: str | None = None, volume: str | None = None):
    """The trace in chunks of at most ``chunk_requests`` requests; iolog, CSV and blkparse text and the public
    formats stream from disk (bounded memory whatever the file's size), .npz is read whole."""
    fmt = format or detect_format(path)
    if fmt in registry.FORMATS:
        yield from registry.iter_formats(path, fmt, action, device, volume, chunk_requests)
        return
    registry.check_selection(path, fmt, device, volume)
    check_readable(path)
    empty = True
    for chunk in _streams(path, fmt, file, action):
        for start in range(0, len(chunk), chunk_requests):
            empty = False
            yield chunk.select(slice(start, start + chunk_requests)) if len(chunk) > chunk_requests else chunk
    if empty:
        yield Trace.from_arrays([], [], [], None, path)


def format_for_output(path: str) -> str:
    """The format a file name asks for: .iolog[.gz] -> iolog v3, .csv -> CSV, .npz -> binary."""
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in ((".iolog", "iolog"), (".log", "iolog"), (".csv", "csv"), (".npz", "npz")):
        if name.endswith(suffix):
            return fmt
    raise QsimError(f"{path}: cannot tell the format from the name (use .iolog, .iolog.gz, .csv or .npz)", 2)


def write_trace(trace: Trace, path: str, fio_file: str = "/dev/vda") -> None:
    fmt = format_for_output(path)
    try:
        if fmt == "iolog":
            write_iolog(trace, path, fio_file)
        elif fmt == "csv":
            write_csv_trace(trace, path)
        else:
            write_npz_trace(trace, path)
    except OSError as exc:
        raise QsimError(f"{path}: cannot write ({exc.strerror or exc})") from None


__all__ = ["FORMATS", "detect_format", "iter_trace", "read_trace", "write_trace", "format_for_output", "Trace"]
