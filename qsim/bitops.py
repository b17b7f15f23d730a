"""Single-instruction bit counts for the numba kernels (LLVM's ctpop / cttz / ctlz), instead of bit-by-bit loops.

All take an int64 whose bits are read as an unsigned word, and return an int64. The ``py_`` versions are the plain
Python definitions: the tests hold the compiled ones to them, and they stand in when numba's JIT is disabled (the
test that runs the kernels as plain Python).
"""

from __future__ import annotations

from numba import config

MASK64 = (1 << 64) - 1


def py_popcount64(word):
    return bin(int(word) & MASK64).count("1")


def py_trailing_zeros32(word):
    low = int(word) & 0xFFFFFFFF
    return 32 if low == 0 else (low & -low).bit_length() - 1


def py_leading_zeros32(word):
    return 32 - (int(word) & 0xFFFFFFFF).bit_length()


def py_trailing_zeros64(word):
    w = int(word) & MASK64
    return 64 if w == 0 else (w & -w).bit_length() - 1


if config.DISABLE_JIT:
    popcount64, trailing_zeros32 = py_popcount64, py_trailing_zeros32
    leading_zeros32, trailing_zeros64 = py_leading_zeros32, py_trailing_zeros64
else:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    @intrinsic
    def _ctpop(typingctx, word):
        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])
        return types.int64(types.int64), codegen

    @intrinsic
    def _cttz(typingctx, word):
        def codegen(context, builder, signature, args):
            return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))
        return types.int64(types.int64), codegen

    @intrinsic
    def _ctlz(typingctx, word):
        def codegen(context, builder, signature, args):
            return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))
        return types.int64(types.int64), codegen

    @njit(cache=True, inline="always")
    def popcount64(word):
        """Set bits in a 64-bit word."""
        return _ctpop(word)

    @njit(cache=True, inline="always")
    def trailing_zeros32(word):
        """Zero bits below the lowest set bit of the low 32 bits (32 when they are all zero)."""
        return _cttz((word & 0xFFFFFFFF) | (1 << 32))

    @njit(cache=True, inline="always")
    def leading_zeros32(word):
        """Zero bits above the highest set bit of the low 32 bits (32 when they are all zero)."""
        return _ctlz(word & 0xFFFFFFFF) - 32

    @njit(cache=True, inline="always")
    def trailing_zeros64(word):
        """Zero bits below the lowest set bit (64 for zero)."""
        return _cttz(word)
