"""A trace: columnar numpy arrays of requests (op, offset, length in bytes, optional time in seconds).

21 bytes per request in memory (1 + 8 + 4 + 8 with times, 13 without). pandas appears only at the edges
(``to_frame``). Readers and writers live in ``qsim.traceio``, generators in ``qsim.synth``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .codes import DISCARD, FLUSH, OFFSET_POLICIES, OP_NAMES, READ, WRITE  # noqa: F401 (the readers' names)
from .errors import QsimError

MAX_LENGTH = 2**32 - 1


@dataclass(frozen=True, eq=False)
class Trace:
    """Requests in issue order. ``op`` uint8 (READ, WRITE, DISCARD, FLUSH), ``offset`` int64 bytes, ``length`` uint32
    bytes (0 for flushes), ``time`` float64 seconds since the start or None. ``source`` names the file it came from."""

    op: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    time: np.ndarray | None = None
    source: str = field(default="<memory>")

    def __post_init__(self) -> None:
        n = len(self.op)
        if len(self.offset) != n or len(self.length) != n or (self.time is not None and len(self.time) != n):
            raise ValueError("trace columns differ in length")

    @classmethod
    def from_arrays(cls, op, offset, length, time=None, source: str = "<memory>") -> Trace:
        """Build a trace from any array-likes, converting to the compact dtypes (and checking they fit)."""
        length = np.asarray(length)
        if length.size and (length.min() < 0 or length.max() > MAX_LENGTH):
            raise QsimError(f"{source}: request lengths must be between 0 and 4 GiB - 1")
        return cls(
            np.ascontiguousarray(op, dtype=np.uint8),
            np.ascontiguousarray(offset, dtype=np.int64),
            np.ascontiguousarray(length, dtype=np.uint32),
            None if time is None else np.ascontiguousarray(time, dtype=np.float64),
            source,
        )

    def __len__(self) -> int:
        return len(self.op)

    @property
    def end(self) -> np.ndarray:
        """End offset of each request (bytes, exclusive)."""
        return self.offset + self.length.astype(np.int64)

    @property
    def max_end_offset(self) -> int:
        io = self.op != FLUSH
        return int(self.end[io].max()) if io.any() else 0

    def select(self, mask_or_index) -> Trace:
        time = None if self.time is None else self.time[mask_or_index]
        return Trace(self.op[mask_or_index], self.offset[mask_or_index], self.length[mask_or_index], time, self.source)

    def to_frame(self):
        """The trace as a pandas DataFrame with columns op (names), offset, length[, time]."""
        import pandas as pd

        frame = pd.DataFrame({
            "op": pd.Categorical.from_codes(self.op, categories=list(OP_NAMES)),
            "offset": self.offset,
            "length": self.length,
        })
        if self.time is not None:
            frame["time"] = self.time
        return frame

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.op, self.offset, self.length, self.time) if a is not None)


def concat(traces: list[Trace]) -> Trace:
    """Join traces in order (times are kept only if every part has them)."""
    if not traces:
        return Trace.from_arrays([], [], [])
    times = None
    if all(t.time is not None for t in traces):
        times = np.concatenate([t.time for t in traces])
    return Trace(
        np.concatenate([t.op for t in traces]),
        np.concatenate([t.offset for t in traces]),
        np.concatenate([t.length for t in traces]),
        times,
        traces[0].source,
    )


def apply_offset_policy(trace: Trace, virtual_size: int, policy: str = "error") -> Trace:
    """Deal with requests that end beyond the disk: fail naming the first one, drop them, or wrap them around.

    ``wrap`` moves the request's start to ``offset % virtual_size`` and clips the length so it ends on the disk.
    """
    if policy not in OFFSET_POLICIES:
        raise QsimError(f"--offset-policy: {policy!r} is not one of {', '.join(OFFSET_POLICIES)}", 2)
    if not len(trace) or int(trace.offset.max()) + int(trace.length.max()) <= virtual_size:
        return trace  # the common case, decided without a temporary per request
    io = trace.op != FLUSH
    beyond = io & (trace.end > virtual_size)
    if not beyond.any():
        return trace
    if policy == "error":
        k = int(np.argmax(beyond))
        count = int(beyond.sum())
        raise QsimError(
            f"{trace.source}: request {k + 1} ({OP_NAMES[trace.op[k]]} at offset {trace.offset[k]}, "
            f"{trace.length[k]} bytes) ends beyond the disk size {virtual_size} ({count} such request"
            f"{'s' if count > 1 else ''}); give a larger --size or choose --offset-policy skip or wrap"
        )
    if policy == "skip":
        return trace.select(~beyond)
    offset = trace.offset.copy()
    length = trace.length.copy()
    offset[beyond] %= virtual_size
    room = virtual_size - offset[beyond]
    length[beyond] = np.minimum(length[beyond].astype(np.int64), room).astype(np.uint32)
    return Trace(trace.op, offset, length, trace.time, trace.source)


def trace_stats(trace: Trace) -> dict[str, object]:
    """What ``qsim trace info`` prints: counts, bytes, extent, footprint, alignment, request-size histogram."""
    op, length, offset = trace.op, trace.length.astype(np.int64), trace.offset
    io = op != FLUSH
    reads, writes, discards = op == READ, op == WRITE, op == DISCARD
    stats: dict[str, object] = {
        "source": trace.source,
        "requests": int(len(trace)),
        "reads": int(reads.sum()),
        "writes": int(writes.sum()),
        "discards": int(discards.sum()),
        "flushes": int((op == FLUSH).sum()),
        "read_bytes": int(length[reads].sum()),
        "write_bytes": int(length[writes].sum()),
        "discard_bytes": int(length[discards].sum()),
        "min_offset": int(offset[io].min()) if io.any() else 0,
        "max_end_offset": trace.max_end_offset,
        "footprint_4k_blocks": _footprint(offset[io], length[io], 4096),
        "footprint_64k_clusters": _footprint(offset[io], length[io], 65536),
        "unaligned_share": float(((offset[io] | length[io]) % 4096 != 0).mean()) if io.any() else 0.0,
        "duration_s": float(trace.time[-1] - trace.time[0]) if trace.time is not None and len(trace) else None,
    }
    sizes = length[io & (length > 0)]
    if sizes.size:
        buckets = np.int64(1) << np.ceil(np.log2(sizes)).astype(np.int64)
        values, counts = np.unique(buckets, return_counts=True)
        stats["size_histogram"] = {int(v): int(c) for v, c in zip(values, counts)}
    else:
        stats["size_histogram"] = {}
    return stats


def _footprint(offset: np.ndarray, length: np.ndarray, unit: int) -> int:
    """Distinct ``unit``-byte blocks touched by the requests: the length of the union of their block intervals.

    Starts and ends are sorted separately (np.sort is far faster than argsort); a component of the union ends where
    no interval is open, and the next one starts at the first start after that point.
    """
    if offset.size == 0:
        return 0
    starts = np.sort(offset // unit)
    ends = np.sort((offset + np.maximum(length, 1) - 1) // unit + 1)  # exclusive
    open_after = np.searchsorted(starts, ends, "right") - np.searchsorted(ends, ends, "right")
    last_of_ties = np.append(ends[1:] != ends[:-1], True)
    component_ends = ends[(open_after == 0) & last_of_ties]
    component_starts = np.append(starts[:1], starts[np.searchsorted(starts, component_ends[:-1], "right")])
    return int((component_ends - component_starts).sum())
