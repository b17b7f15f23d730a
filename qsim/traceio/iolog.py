"""fio iolog, versions 2 and 3 (what ``fio --write_iolog`` records and ``--read_iolog`` replays).

v2: ``FILE add|open|close`` and ``FILE read|write|sync|datasync|trim|wait OFFSET LENGTH``; v3 puts a timestamp in
microseconds first. Parsing is pandas' C tokenizer in chunks (millions of lines per second, the text never held whole
in memory); when something is off, a slow line-by-line pass finds the first bad line and says what is wrong with it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import QsimError
from ..trace import DISCARD, FLUSH, READ, WRITE, Trace, concat
from .textfile import head_lines, open_binary, text_lines

HEADERS = {"fio version 2 iolog": 2, "fio version 3 iolog": 3}
IO_ACTIONS = {"read": READ, "write": WRITE, "trim": DISCARD, "sync": FLUSH, "datasync": FLUSH}
FILE_ACTIONS = {"add", "open", "close"}
OTHER_ACTIONS = {"wait"}
ALL_ACTIONS = set(IO_ACTIONS) | FILE_ACTIONS | OTHER_ACTIONS
CHUNK_LINES = 1 << 21
EXACT_FLOAT_LIMIT = 2**53


def iolog_version(path: str) -> int | None:
    lines = head_lines(path, 1)
    return HEADERS.get(lines[0].strip()) if lines else None


def read_iolog(path: str, file: str | None = None) -> Trace:
    """Requests of one file of a fio iolog. ``file`` picks one when the log names several (required then)."""
    chunks: list[_Chunk] = []
    files: set[str] = set()
    for chunk in _chunks(path):
        chunks.append(chunk)
        files |= chunk.files
    return _pick_file(path, chunks, files, file)


def iter_iolog(path: str, file: str | None = None, chunk_lines: int = CHUNK_LINES):
    """The log's requests in chunks of about ``chunk_lines`` lines, never holding the whole text or trace: for traces
    larger than memory. A second file showing up without ``file`` is an error at that point."""
    seen: set[str] = set()
    for chunk in _chunks(path, chunk_lines):
        seen |= chunk.files
        if file is None and len(seen) > 1:
            raise QsimError(f"{path}: the log names several files ({', '.join(sorted(seen))}); choose one with --file")
        if file is None or file in chunk.files:
            yield _pick_file(path, [chunk], chunk.files, file)
    if file is not None and file not in seen:
        raise QsimError(f"{path}: --file {file!r} is not in the log (it names: {', '.join(sorted(seen)) or 'none'})")


def _chunks(path: str, chunk_lines: int = CHUNK_LINES):
    version = iolog_version(path)
    if version is None:
        raise QsimError(f"{path}: line 1: expected 'fio version 2 iolog' or 'fio version 3 iolog'")
    names = (["time"] if version == 3 else []) + ["file", "action", "offset", "length"]
    dtypes = {"file": "category", "action": "category", "offset": "float64", "length": "float64"}
    if version == 3:
        dtypes["time"] = "float64"
    first_line = 2
    try:
        with open_binary(path) as stream:
            reader = pd.read_csv(stream, sep=" ", header=None, skiprows=1, names=names, dtype=dtypes, engine="c",
                                 chunksize=chunk_lines, skip_blank_lines=False, na_filter=True)
            for frame in reader:
                chunk, _ = _convert_chunk(frame, path, first_line, version)
                first_line += len(frame)
                yield chunk
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        _explain_bad_line(path, version, exc)


def _convert_chunk(chunk: pd.DataFrame, path: str, first_line: int, version: int) -> tuple[_Chunk, set[str]]:
    action = chunk["action"]
    action_names = [str(c) for c in action.cat.categories]
    unknown = [name for name in action_names if name not in ALL_ACTIONS]
    codes = action.cat.codes.to_numpy()
    if unknown:
        bad = np.isin(codes, [action_names.index(name) for name in unknown])
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {first_line + k}: unknown action {action.iloc[k]!r} (expected one of "
                        f"{', '.join(sorted(ALL_ACTIONS))})")
    op_of_code = np.array([IO_ACTIONS.get(name, 255) for name in action_names] + [255], dtype=np.uint8)
    op_all = op_of_code[codes]  # code -1 (blank line) picks the trailing 255
    is_io = op_all != 255
    op = op_all[is_io]
    offset = chunk["offset"].to_numpy()[is_io]
    length = chunk["length"].to_numpy()[is_io]
    line = np.flatnonzero(is_io) + first_line
    missing = np.isnan(offset) | np.isnan(length)
    if missing.any():
        k = int(np.argmax(missing))
        raise QsimError(f"{path}: line {line[k]}: {action_names[codes[is_io][k]]} needs an offset and a length")
    bad = (offset < 0) | (offset != np.floor(offset)) | (offset >= EXACT_FLOAT_LIMIT)
    if bad.any():
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {line[k]}: offset {offset[k]:.0f} is not a byte offset (expected a whole "
                        "number from 0 to 2^53)")
    rw = op != FLUSH
    bad = rw & ((length <= 0) | (length != np.floor(length)) | (length > 2**32 - 1))
    if bad.any():
        k = int(np.argmax(bad))
        raise QsimError(f"{path}: line {line[k]}: length {length[k]:g} is not valid (expected 1 to 4294967295 "
                        "bytes)")
    length = np.where(rw, length, 0)
    time = chunk["time"].to_numpy()[is_io] / 1e6 if version == 3 else None
    file_codes = chunk["file"].cat.codes.to_numpy()[is_io]
    file_names = np.array([str(c) for c in chunk["file"].cat.categories] + [""], dtype=object)
    used = np.unique(file_codes)
    files = {file_names[c] for c in used}
    trace = Trace.from_arrays(op, offset.astype(np.int64), length.astype(np.int64), time, path)
    # Which file each request names matters only when the log names several.
    return _Chunk(trace, file_names[file_codes] if len(files) > 1 else None, files), files


class _Chunk(NamedTuple):
    trace: Trace
    file_per_request: np.ndarray | None  # None: every request names the one file in ``files``
    files: set[str]


def _pick_file(path: str, chunks: list[_Chunk], files: set[str], file: str | None) -> Trace:
    if file is None and len(files) > 1:
        raise QsimError(f"{path}: the log names {len(files)} files ({', '.join(sorted(files))}); choose one with "
                        "--file")
    if file is not None and file not in files:
        raise QsimError(f"{path}: --file {file!r} is not in the log (it names: {', '.join(sorted(files)) or 'none'})")
    kept = []
    for chunk in chunks:
        if file is None or (chunk.file_per_request is None and file in chunk.files):
            kept.append(chunk.trace)
        elif chunk.file_per_request is not None:
            kept.append(chunk.trace.select(chunk.file_per_request == file))
    return replace(concat(kept), source=path)


def _explain_bad_line(path: str, version: int, exc: Exception) -> None:
    """Find the first line the fast parser choked on and raise a QsimError naming it."""
    want = 5 if version == 3 else 4
    for number, text in text_lines(path):
        if number == 1 or not text.strip():
            continue
        fields = text.split()
        problem = _line_problem(fields, version, want)
        if problem:
            raise QsimError(f"{path}: line {number}: {problem}: {text[:120]!r}")
    raise QsimError(f"{path}: cannot parse as a fio iolog v{version} ({exc})")


def _line_problem(fields: list[str], version: int, want: int) -> str | None:
    shape = ("TIME " if version == 3 else "") + "FILE ACTION [OFFSET LENGTH]"
    if len(fields) not in (want - 2, want):
        return f"expected {shape}, found {len(fields)} fields"
    if version == 3 and not fields[0].isdigit():
        return f"timestamp {fields[0]!r} is not a whole number of microseconds"
    action = fields[-3] if len(fields) == want else fields[-1]
    if action not in ALL_ACTIONS:
        return f"unknown action {action!r}"
    if len(fields) == want:
        for name, value in (("offset", fields[-2]), ("length", fields[-1])):
            if not value.lstrip("-").isdigit():
                return f"{name} {value!r} is not a whole number"
    return None


def write_iolog(trace: Trace, path: str, file: str = "/dev/vda") -> None:
    """Write fio iolog v3 that ``fio --read_iolog`` replays (times become microseconds; 0 when unknown)."""
    names = np.array(["read", "write", "trim", "sync"])
    usec = np.zeros(len(trace), dtype=np.int64) if trace.time is None else np.round(trace.time * 1e6).astype(np.int64)
    frame = pd.DataFrame({"t": usec, "f": file, "a": names[trace.op], "o": trace.offset, "l": trace.length})
    last = int(usec[-1]) if len(usec) else 0
    opener = _open_text_out(path)
    with opener as out:
        out.write(f"fio version 3 iolog\n0 {file} add\n0 {file} open\n")
        frame.to_csv(out, sep=" ", header=False, index=False, lineterminator="\n")
        out.write(f"{last} {file} close\n")


def _open_text_out(path: str):
    import gzip

    if path.endswith(".gz"):
        return gzip.open(path, "wt", encoding="utf-8", compresslevel=6)
    return open(path, "w", encoding="utf-8")
