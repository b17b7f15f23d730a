"""Synthetic workloads described in one line, seeded and deterministic, spelled after fio where fio has a word.

Patterns: ``seq`` (sequential, wrapping at the end), ``uniform`` (fio's random), ``zipf:ALPHA``, ``hotspot:IO/DISK``
(IO% of the requests on the first DISK% of the disk). Block sizes: ``4k``, a range ``4k-64k`` (powers of two in
between, like fio's bsrange with blockalign), or fio's bssplit ``4k/50:64k/50``. ``read_share`` is fio's rwmixread.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .codes import MAX_SYNTH_REQUESTS
from .errors import UsageError
from .trace import FLUSH, READ, WRITE, Trace
from .units import parse_number, parse_size

PATTERNS = ("seq", "uniform", "zipf", "hotspot")
MAX_REQUESTS = MAX_SYNTH_REQUESTS  # made in memory (about 40 bytes each while generating)


@dataclass(frozen=True)
class BlockSizes:
    """Request sizes (bytes) and their weights."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> BlockSizes:
        text = text.strip()
        if ":" in text or "/" in text:
            sizes, weights = [], []
            for item in text.split(":"):
                size, _, weight = item.partition("/")
                sizes.append(parse_size(size, "--bs"))
                try:
                    weights.append(parse_number(weight, "--bs") if weight else math.nan)
                except UsageError:
                    raise UsageError(f"--bs {text[:60]}: weight {weight[:20]!r} is not a number (bssplit: "
                                     "4k/50:64k/50)") from None
                if weights[-1] < 0:
                    raise UsageError(f"--bs {text[:60]}: weight {weight[:20]} is negative (bssplit: 4k/50:64k/50)")
            given = sum(w for w in weights if not math.isnan(w))
            missing = sum(1 for w in weights if math.isnan(w))
            rest = max(100.0 - given, 0.0) / missing if missing else 0.0
            weights = [rest if math.isnan(w) else w for w in weights]
        elif "-" in text:
            low, _, high = text.partition("-")
            lo, hi = parse_size(low, "--bs"), parse_size(high, "--bs")
            if lo > hi:
                raise UsageError(f"--bs {text[:60]}: the range goes down")
            sizes = [lo]
            while sizes[-1] * 2 <= hi:
                sizes.append(sizes[-1] * 2)
            weights = [1.0] * len(sizes)
        else:
            sizes, weights = [parse_size(text, "--bs")], [1.0]
        if any(s <= 0 or s > 2**32 - 1 for s in sizes):
            raise UsageError(f"--bs {text[:60]}: block sizes must be from 1 byte to 4G - 1")
        if sum(weights) <= 0:
            raise UsageError(f"--bs {text[:60]}: the weights add up to nothing")
        return cls(tuple(sizes), tuple(weights))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if len(self.sizes) == 1:
            return np.full(n, self.sizes[0], dtype=np.int64)
        p = np.asarray(self.weights) / sum(self.weights)
        return np.asarray(self.sizes, dtype=np.int64)[rng.choice(len(self.sizes), size=n, p=p)]


@dataclass(frozen=True)
class Pattern:
    kind: str
    zipf_alpha: float = 1.2
    hot_io_share: float = 0.9
    hot_disk_share: float = 0.1

    @classmethod
    def parse(cls, text: str) -> Pattern:
        kind, _, arg = text.strip().lower().partition(":")
        kind = {"sequential": "seq", "random": "uniform", "rand": "uniform"}.get(kind, kind)
        if kind not in PATTERNS:
            raise UsageError(f"--pattern {text[:60]}: expected one of seq, uniform, zipf[:ALPHA], hotspot[:IO/DISK]")
        if kind == "zipf" and arg:
            try:
                alpha = parse_number(arg, "--pattern")
            except UsageError:
                raise UsageError(f"--pattern {text[:60]}: zipf takes a number, e.g. zipf:1.2") from None
            if alpha <= 0:
                raise UsageError(f"--pattern {text[:60]}: the zipf exponent must be positive")
            return cls(kind, zipf_alpha=alpha)
        if kind == "hotspot" and arg:
            m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)/([0-9]+(?:\.[0-9]+)?)", arg, re.ASCII)
            if not m or not (0 < float(m.group(1)) <= 100 and 0 < float(m.group(2)) <= 100):
                raise UsageError(f"--pattern {text[:60]}: hotspot takes IO%/DISK%, e.g. hotspot:90/10")
            return cls(kind, hot_io_share=float(m.group(1)) / 100, hot_disk_share=float(m.group(2)) / 100)
        return cls(kind)


def synthesize(
    virtual_size: int,
    requests: int,
    pattern: str | Pattern = "uniform",
    bs: str | BlockSizes = "4k",
    read_share: float = 1.0,
    align: int | None = None,
    flush_every: int = 0,
    seed: int = 0,
    offset: int = 0,
) -> Trace:
    """A trace of ``requests`` requests over ``[offset, virtual_size)``; ``align`` defaults to the smallest block
    size; ``flush_every`` N adds a flush after every N writes (fio's fsync=N)."""
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    sizes = BlockSizes.parse(bs) if isinstance(bs, str) else bs
    if not 0 <= requests <= MAX_REQUESTS:
        raise UsageError(f"--requests {requests}: expected 0 to {MAX_REQUESTS:,} requests (a trace is made in "
                         "memory, about 40 bytes per request)")
    if not 0 <= read_share <= 1:  # NaN fails too
        raise UsageError("--rw (share of reads) must be between 0 and 100")
    if flush_every < 0:
        raise UsageError(f"--fsync {flush_every}: must not be negative (0: no flushes)")
    if seed < 0:
        raise UsageError(f"--seed {seed}: a seed is a whole number from 0")
    align = align or min(sizes.sizes)
    span = virtual_size - offset
    slots = (span - max(sizes.sizes)) // align + 1  # aligned starts at which the largest block still fits
    if span <= 0 or slots <= 0:
        raise UsageError(f"--size {virtual_size}: too small for blocks of {max(sizes.sizes)} bytes")
    rng = np.random.default_rng(seed)
    length = sizes.draw(rng, requests)
    if pattern.kind == "seq":
        ends = np.cumsum(length)
        start = (ends - length) % (slots * align)
        start -= start % align
    elif pattern.kind == "uniform":
        start = rng.integers(0, slots, size=requests) * align
    elif pattern.kind == "zipf":
        start = _zipf_slots(rng, requests, slots, pattern.zipf_alpha) * align
    else:
        hot_slots = max(int(slots * pattern.hot_disk_share), 1)
        hot = rng.random(requests) < pattern.hot_io_share
        start = np.where(hot, rng.integers(0, hot_slots, size=requests),
                         rng.integers(0, slots, size=requests)) * align
    op = np.where(rng.random(requests) < read_share, READ, WRITE).astype(np.uint8)
    trace = Trace.from_arrays(op, start + offset, length, source=f"<synth {pattern.kind}>")
    return add_flushes(trace, flush_every) if flush_every else trace


def _zipf_slots(rng: np.random.Generator, n: int, slots: int, alpha: float) -> np.ndarray:
    """Zipf-distributed ranks over ``slots`` by inverting the continuous CDF, scattered over the disk by a fixed
    bijection (multiplication by an odd constant modulo a power of two, folded back into range)."""
    u = rng.random(n)
    if abs(alpha - 1.0) < 1e-9:
        rank = np.exp(u * math.log(slots + 1)) - 1
    else:
        h = ((slots + 1) ** (1 - alpha) - 1) / (1 - alpha)
        rank = (1 + u * h * (1 - alpha)) ** (1 / (1 - alpha)) - 1
    rank = np.minimum(rank.astype(np.int64), slots - 1)
    return _scatter(rank, slots)


def _scatter(rank: np.ndarray, slots: int) -> np.ndarray:
    """A bijection of [0, slots) so that popular ranks do not all sit at the start of the disk (cycle-walking)."""
    bits = max(int(slots - 1).bit_length(), 1)
    mask = (1 << bits) - 1
    mult = 0x9E3779B97F4A7C15 & mask | 1
    out = rank.copy()
    todo = np.ones(len(out), dtype=bool)
    while todo.any():
        out[todo] = ((out[todo].astype(np.uint64) * np.uint64(mult)) & np.uint64(mask)).astype(np.int64)
        todo = out >= slots
    return out


def add_flushes(trace: Trace, every_writes: int) -> Trace:
    """Insert a flush after every ``every_writes`` writes (fio's fsync=N)."""
    writes = np.cumsum(trace.op == WRITE)
    after = np.flatnonzero((trace.op == WRITE) & (writes % every_writes == 0))
    position = after + 1 + np.arange(len(after))
    n = len(trace) + len(after)
    op = np.empty(n, np.uint8)
    offset = np.zeros(n, np.int64)
    length = np.zeros(n, np.uint32)
    is_flush = np.zeros(n, bool)
    is_flush[position] = True
    op[is_flush] = FLUSH
    op[~is_flush], offset[~is_flush], length[~is_flush] = trace.op, trace.offset, trace.length
    return Trace(op, offset, length, None, trace.source)
