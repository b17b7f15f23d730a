"""Sizes spelled the way qemu-img spells them: parse ``64k``, ``1.5G``, ``0x1000``; format back to ``32M``.

Parsing follows QEMU's ``qemu_strtosz`` (util/cutils.c) so that a size qsim accepts means the same bytes QEMU would:
suffixes B, K, M, G, T, P, E in either case, powers of 1024, an optional fraction that needs a suffix, hex without
fraction or suffix, and results below 2**63.
"""

from __future__ import annotations

import math
import re

from .errors import UsageError

_SUFFIX_SHIFT = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_FORMAT_SUFFIXES = (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("k", 10))
_DECIMAL = re.compile(r"^\s*([0-9]+)(\.[0-9]*)?([a-zA-Z]?)$", re.ASCII)  # ASCII digits only, as strtosz
_HEX = re.compile(r"^\s*0[xX]([0-9a-fA-F]+)$", re.ASCII)
_WHOLE = re.compile(r"[+-]?[0-9]+", re.ASCII)
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
MAX_SIZE = 2**63 - 1


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes named by ``text`` (``"64k"`` -> 65536). ``what`` names the option in the error message."""
    if isinstance(text, int):
        if text < 0 or text > MAX_SIZE:
            raise UsageError(f"{what}: {text} is out of range (0 .. 8E-1)")
        return text
    s = str(text).strip()
    if len(s) > 100:
        raise UsageError(f"{what}: {s[:40]!r}... is not a size")
    hexm = _HEX.match(s)
    if hexm:
        value = int(hexm.group(1), 16)
    else:
        m = _DECIMAL.match(s)
        if not m:
            raise UsageError(
                f"{what}: {text!r} is not a size (expected a number of bytes with an optional suffix "
                "k, M, G, T, P or E, as in 512, 64k, 1.5G, 4T)"
            )
        integral, fraction, suffix = m.groups()
        if suffix and suffix.upper() not in _SUFFIX_SHIFT:
            raise UsageError(f"{what}: unknown size suffix {suffix!r} in {text!r} (use k, M, G, T, P or E)")
        shift = _SUFFIX_SHIFT[suffix.upper()] if suffix else 0
        value = int(integral) << shift
        if fraction and fraction != ".":
            if shift == 0:
                raise UsageError(f"{what}: a fractional size needs a suffix ({text!r}; try e.g. 1.5G)")
            # QEMU turns the fraction into a 64-bit fixed-point number, multiplies exactly and rounds 0.5 up.
            fixed = int(float(fraction) * 2.0**64)
            scaled = fixed << shift
            value += (scaled >> 64) + ((scaled >> 63) & 1)
    if value > MAX_SIZE:
        raise UsageError(f"{what}: {text!r} is too large (the limit is 8E - 1 byte)")
    return value


def format_size(n_bytes: int) -> str:
    """Shortest exact qemu-img spelling: 65536 -> ``64k``, 3 << 29 -> ``1536M``, 1000 -> ``1000``."""
    n = int(n_bytes)
    if n <= 0:
        return str(n)
    for suffix, shift in _FORMAT_SUFFIXES:
        if n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def human_size(n_bytes: float) -> str:
    """Approximate, for people: 1572864 -> ``1.5 MiB``. Not for pasting into QEMU options (use format_size)."""
    n = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.3g} {unit}" if n < 100 else f"{n:.0f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_percent(text: str, what: str = "coverage") -> float:
    """``"50%"`` or ``"0.5"`` -> 0.5, in (0, 1]."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a share (expected e.g. 50% or 0.5)") from None
    if not 0 < value <= 1:
        raise UsageError(f"{what}: {text!r} must be more than 0% and at most 100%")
    return value


def parse_whole(text: str | int, what: str, minimum: int = 0, maximum: int | None = None) -> int:
    """A whole number written in ASCII digits (``int()`` would take ``١٠`` and ``1_0``), within the bounds."""
    s = str(text).strip()
    if not _WHOLE.fullmatch(s) or len(s) > 30:
        raise UsageError(f"{what}: {s[:40]!r} is not a whole number")
    value = int(s)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise UsageError(f"{what}: {value} is out of range (expected {bound})")
    return value


def parse_number(text: str | float, what: str) -> float:
    """A finite decimal number written in ASCII (``float()`` would take ``nan``, ``inf`` and ``١٠``)."""
    s = str(text).strip()
    if not _NUMBER.fullmatch(s) or len(s) > 40 or not math.isfinite(float(s)):
        raise UsageError(f"{what}: {s[:40]!r} is not a number")
    return float(s)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
