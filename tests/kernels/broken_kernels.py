"""Negative controls for the compile test: kernels that Triton's interpreter runs but its compiler
refuses (or compiles badly), and one that compiles cleanly. tests/kernels/test_compile.py shows
that kernels/aot.py reports each of them."""

from __future__ import annotations

import triton
import triton.language as tl

MODE = 1  # a plain int: compiled @triton.jit code may only read tl.constexpr globals
MODE_CONSTEXPR = tl.constexpr(1)


@triton.jit
def global_int_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    if MODE == 1:  # NameError when compiled
        x = x + 1.0
    tl.store(x_ptr + offs, x, mask=offs < n)


@triton.jit
def constexpr_global_kernel(x_ptr, n, BLOCK: tl.constexpr):
    """The same with a tl.constexpr global: compiles."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    if MODE_CONSTEXPR == 1:
        x = x + 1.0
    tl.store(x_ptr + offs, x, mask=offs < n)


@triton.jit
def loop_type_change_kernel(x_ptr, out_ptr, rows, BLOCK: tl.constexpr):
    """acc starts int32 and becomes int64 inside the loop (numpy promotes; the compiler refuses)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for r in range(0, rows):
        acc += tl.load(x_ptr + r * BLOCK + offs).to(tl.int64)
    tl.store(out_ptr + offs, acc)


@triton.jit
def spilling_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """BLOCK floats per program, all live across two reductions: with one warp and BLOCK = 2048
    that is 64 values per thread, more than a launch with maxnreg=32 allows, so ptxas spills."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    y = tl.exp(x) * tl.sum(x, 0)
    tl.store(out_ptr + offs, y / tl.max(y, 0))
