"""Triton twins of the plane split/merge and bit packing in planes.py, with their launchers.

The layouts, references and format codes are planes.py's; every kernel here is tested against
its reference bit for bit (tests/kernels/test_planes_triton.py). ``load_raw`` and ``merge_raw``
are also the tail of the fused rANS decoder (ans_triton.py): symbols + raw bits → finished
floats, stored through the raw-bits view of the output (``out_bits_view``); the decoder loads a
step's raw bits 4 steps ahead of the merge.
"""

from __future__ import annotations

import torch

from . import HAS_TRITON
from .planes import (
    FMT_BF16,
    FMT_FP16,
    FMT_FP32,
    FMT_LOSSY,
    FMT_OF,
    SCALE_BITS,
    lossless_layout,
    n_blocks,
    packed_nbytes,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    # The same codes as constexpr globals: compiled @jit code may only read constexpr globals
    # (plain ints are a NameError under Triton's compiler, though the interpreter accepts them).
    _BF16: tl.constexpr = tl.constexpr(FMT_BF16)
    _FP16: tl.constexpr = tl.constexpr(FMT_FP16)
    _FP32: tl.constexpr = tl.constexpr(FMT_FP32)
    _LOSSY: tl.constexpr = tl.constexpr(FMT_LOSSY)

    # Index arithmetic: Triton passes an int argument below 2**31 as i32, so products of the
    # element count n (2 * n, (K + 1) * n, n * WIDTH) would wrap for tensors of a few hundred
    # million weights. Every kernel widens n to int64 once and derives sizes from that.

    # A mask of None (a constexpr: the rANS decoder's full trips, whose lanes are all in range)
    # compiles to unpredicated loads and stores: no compare, no select (but for the second byte
    # of a straddling field, still guarded by byte + 1 < total: the last byte has no successor).

    @triton.jit
    def _load(ptr, mask):
        """tl.load of ``ptr`` where ``mask`` (None: everywhere), 0 elsewhere."""
        if mask is None:  # noqa: SIM108 (a constexpr branch: Triton compiles only one load)
            v = tl.load(ptr)
        else:
            v = tl.load(ptr, mask=mask, other=0)
        return v

    @triton.jit
    def _store(ptr, value, mask):
        """tl.store of ``value`` at ``ptr`` where ``mask`` (None: everywhere)."""
        if mask is None:
            tl.store(ptr, value)
        else:
            tl.store(ptr, value, mask=mask)

    @triton.jit
    def field_bytes(field_ptr, offs, mask, total, WIDTH: tl.constexpr):
        """The bytes (b0, b1) that hold element ``offs`` of a packed WIDTH-bit field, as loaded
        (uint8: widened where used, so that a loop carrying them waits for no load); b1 is 0
        where no field straddles two bytes (WIDTH 1, 2, 4, 8)."""
        byte = (offs >> 3) * WIDTH + (((offs & 7) * WIDTH) >> 3)
        if offs.dtype == tl.int32:  # offsets from a chunk's origin: bound them in int32 too
            total = tl.minimum(total, 2**31 - 1).to(tl.int32)
        b0 = _load(field_ptr + byte, mask)
        if WIDTH == 1 or WIDTH == 2 or WIDTH == 4 or WIDTH == 8:
            b1 = tl.zeros_like(b0)
        else:
            inside = byte + 1 < total  # the last byte has no successor
            if mask is not None:
                inside = inside & mask
            b1 = tl.load(field_ptr + byte + 1, mask=inside, other=0)
        return b0, b1

    @triton.jit
    def field_value(b0, b1, offs, WIDTH: tl.constexpr):
        """Element ``offs`` of a packed WIDTH-bit field from its bytes (field_bytes), as uint32."""
        sh = (((offs & 7) * WIDTH) & 7).to(tl.uint32)
        return ((b0.to(tl.uint32) | (b1.to(tl.uint32) << 8)) >> sh) & ((1 << WIDTH) - 1)

    @triton.jit
    def load_raw(
        offs,
        mask,
        n,
        raw_ptr,
        scale_ptr,
        origin,
        FMT: tl.constexpr,
        K: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        NORMALIZE: tl.constexpr,
    ):
        """The raw bytes of elements ``offs``, as four vectors (0 where unused) for merge_raw:
        bf16 the sign|mantissa byte; fp16 the m[7:0] byte and the byte holding m[9:8]; fp32 the
        three raw bytes (m[7:0], m[15:8], sign|m[22:16]); lossy the bytes holding the (K + 1)-bit
        sign|mantissa code and, with NORMALIZE, the bytes holding its block's 7-bit scale. Loads
        only, so that the rANS decoder can issue them steps ahead and nothing waits for them
        until the merge: whole bytes come widened to uint32 (the load widens them), a packed
        field's bytes as loaded (uint8; merge_raw widens them: widening a masked load is an AND
        that would wait for it). ``mask`` None: every element is in range.

        Elements are ``origin + offs``: ``origin`` a multiple of 8 (of 8 * BLOCK_SIZE with
        NORMALIZE), so that the offsets keep a packed field's byte phase (and a block scale's);
        the rANS decoder passes its chunk's origin and int32 offsets, others 0 and int64."""
        n = tl.cast(n, tl.int64)  # sizes below are products of n: keep them 64-bit
        o = tl.cast(origin, tl.int64)
        if FMT == _LOSSY:
            at = o * (K + 1) // 8  # the origin's byte in the field
            r0, r1 = field_bytes(raw_ptr + at, offs, mask, ((K + 1) * n + 7) // 8 - at, K + 1)
        else:
            r0 = _load(raw_ptr + o + offs, mask).to(tl.uint32)  # a whole byte: widened by the load
            r1 = tl.zeros_like(r0)
        r2 = tl.zeros_like(r0)
        r3 = tl.zeros_like(r0)
        if FMT == _FP16:
            r1, _ = field_bytes(raw_ptr + n + o // 4, offs, mask, (2 * n + 7) // 8 - o // 4, 2)
        elif FMT == _FP32:
            r1 = _load(raw_ptr + n + o + offs, mask).to(tl.uint32)
            r2 = _load(raw_ptr + 2 * n + o + offs, mask).to(tl.uint32)
        elif FMT == _LOSSY and NORMALIZE:
            nb = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
            at = o // BLOCK_SIZE * 7 // 8  # the origin's block's byte in the scales
            total = (7 * nb + 7) // 8 - at
            r2, r3 = field_bytes(scale_ptr + at, offs // BLOCK_SIZE, mask, total, 7)
        return r0, r1, r2, r3

    @triton.jit
    def merge_raw(
        sym,
        r0,
        r1,
        r2,
        r3,
        offs,
        mask,
        out_ptr,
        FMT: tl.constexpr,
        K: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        NORMALIZE: tl.constexpr,
        OUT: tl.constexpr,
    ):
        """Combine symbols with their raw bytes (r0..r3 from load_raw) and store the floats at
        element indices ``offs``.

        ``out_ptr`` holds raw bits: uint16 for bf16/fp16 outputs, int32 for fp32 (OUT says which
        of FMT_BF16/FP16/FP32 the output is; lossless formats write their own dtype). ``mask``
        None: every element is in range. ``offs`` counts from an origin as in load_raw, where
        ``out_ptr`` points.
        """
        s = sym.to(tl.uint32)
        r0 = r0.to(tl.uint32)
        r1 = r1.to(tl.uint32)
        r2 = r2.to(tl.uint32)
        r3 = r3.to(tl.uint32)
        if FMT == _BF16:
            # sign (bit 7 of the byte) to bit 15, m[6:0] stay: r0 * 0x101 holds both in place
            bits = ((r0 * 0x101) & 0x807F) | (s << 7)
            _store(out_ptr + offs, bits.to(tl.uint16), mask)
        elif FMT == _FP16:
            hi2 = field_value(r1, r2, offs, 2)  # r2 is 0: a 2-bit field never straddles
            bits = (s << 10) | (hi2 << 8) | r0
            _store(out_ptr + offs, bits.to(tl.uint16), mask)
        elif FMT == _FP32:
            bits = ((r2 & 0x80) << 24) | (s << 23) | ((r2 & 0x7F) << 16) | (r1 << 8) | r0
            _store(out_ptr + offs, bits.to(tl.int32, bitcast=True), mask)
        else:
            code = field_value(r0, r1, offs, K + 1)
            mant = code & ((1 << K) - 1)
            bits = ((code >> K) << 15) | (s << 7) | (mant << (7 - K))
            y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True).to(tl.float32)
            if NORMALIZE:
                m = field_value(r2, r3, offs // BLOCK_SIZE, 7)
                y = y * (1.0 + m.to(tl.float32) / 128.0)
            if OUT == _BF16:  # round to nearest even by hand: the same on GPU and interpreter
                yb = y.to(tl.uint32, bitcast=True)
                yb = (yb + 0x7FFF + ((yb >> 16) & 1)) >> 16
                _store(out_ptr + offs, yb.to(tl.uint16), mask)
            elif OUT == _FP16:
                h = y.to(tl.float16).to(tl.uint16, bitcast=True)
                _store(out_ptr + offs, h, mask)
            else:
                _store(out_ptr + offs, y.to(tl.int32, bitcast=True), mask)

    @triton.jit
    def _merge_kernel(
        sym_ptr,
        raw_ptr,
        scale_ptr,
        out_ptr,
        n,
        first_program,
        FMT: tl.constexpr,
        K: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        NORMALIZE: tl.constexpr,
        OUT: tl.constexpr,
        TILE: tl.constexpr,
    ):
        """Elements [p * TILE, (p + 1) * TILE) for program p = first_program + program_id."""
        pid = tl.program_id(0).to(tl.int64) + first_program
        offs = pid * TILE + tl.arange(0, TILE)
        mask = offs < n
        sym = tl.load(sym_ptr + offs, mask=mask, other=0)
        r0, r1, r2, r3 = load_raw(
            offs, mask, n, raw_ptr, scale_ptr, 0, FMT, K, BLOCK_SIZE, NORMALIZE
        )
        merge_raw(sym, r0, r1, r2, r3, offs, mask, out_ptr, FMT, K, BLOCK_SIZE, NORMALIZE, OUT)

    @triton.jit
    def _split_kernel(
        x_ptr, sym_ptr, raw_ptr, n, first_program, FMT: tl.constexpr, TILE: tl.constexpr
    ):
        """Lossless split; fp16's 2-bit field is written by the caller-side pack kernel below."""
        n = tl.cast(n, tl.int64)  # fp32 writes raw + 2 * n: past 2**31 for n >= 2**30
        pid = tl.program_id(0).to(tl.int64) + first_program
        offs = pid * TILE + tl.arange(0, TILE)
        mask = offs < n
        if FMT == _FP32:
            bits = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
            sym = (bits >> 23) & 0xFF
            top = ((bits >> 24) & 0x80) | ((bits >> 16) & 0x7F)
            tl.store(raw_ptr + offs, (bits & 0xFF).to(tl.uint8), mask=mask)
            tl.store(raw_ptr + n + offs, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask)
            tl.store(raw_ptr + 2 * n + offs, top.to(tl.uint8), mask=mask)
        else:
            bits = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.uint32)
            if FMT == _BF16:
                sym = (bits >> 7) & 0xFF
                raw = ((bits >> 8) & 0x80) | (bits & 0x7F)
            else:
                sym = bits >> 10
                raw = bits & 0xFF
            tl.store(raw_ptr + offs, raw.to(tl.uint8), mask=mask)
        tl.store(sym_ptr + offs, sym.to(tl.uint8), mask=mask)

    @triton.jit
    def pack_group(codes, WIDTH: tl.constexpr, GROUPS: tl.constexpr):
        """[GROUPS * 8] uint32 codes → [GROUPS, 8] bytes, of which the first WIDTH per row count."""
        c = tl.reshape(codes.to(tl.uint64), (GROUPS, 8))
        j = tl.arange(0, 8)[None, :].to(tl.uint64)
        words = tl.sum(c << (j * WIDTH), axis=1)  # fields are disjoint: sum == or
        return ((words[:, None] >> (j * 8)) & 0xFF).to(tl.uint8)

    @triton.jit
    def _pack_kernel(
        codes_ptr, out_ptr, n, first_program, WIDTH: tl.constexpr, GROUPS: tl.constexpr
    ):
        """Groups [p * GROUPS, (p + 1) * GROUPS) of 8 codes for program p = first + program_id."""
        n = tl.cast(n, tl.int64)  # n * WIDTH passes 2**31 for n >= 2**31 / WIDTH
        g0 = (tl.program_id(0).to(tl.int64) + first_program) * GROUPS
        offs = g0 * 8 + tl.arange(0, GROUPS * 8)
        codes = tl.load(codes_ptr + offs, mask=offs < n, other=0).to(tl.uint32)
        packed = pack_group(codes, WIDTH, GROUPS)
        g = g0 + tl.arange(0, GROUPS)[:, None]
        j = tl.arange(0, 8)[None, :]
        dst = g * WIDTH + j
        tl.store(out_ptr + dst, packed, mask=(j < WIDTH) & (dst < (n * WIDTH + 7) // 8))

    @triton.jit
    def _lossy_split_kernel(
        x_ptr,
        sym_ptr,
        field_ptr,
        scale_ptr,
        n,
        first_program,
        K: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        NORMALIZE: tl.constexpr,
        TILE: tl.constexpr,
    ):
        """TILE elements (a multiple of 8 and of BLOCK_SIZE) per program; program p =
        first_program + program_id writes elements, field groups and scales of that tile."""
        n = tl.cast(n, tl.int64)  # (K + 1) * n passes 2**31 for n >= 2**31 / (K + 1)
        pid = tl.program_id(0).to(tl.int64) + first_program
        offs = pid * TILE + tl.arange(0, TILE)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            a = tl.max(tl.reshape(tl.abs(x), (TILE // BLOCK_SIZE, BLOCK_SIZE)), axis=1)
            abits = a.to(tl.uint32, bitcast=True)
            m = tl.where(((abits >> 23) & 0xFF) != 0, (abits >> 16) & 0x7F, 0)
            blk = pid * (TILE // BLOCK_SIZE) + tl.arange(0, TILE // BLOCK_SIZE)
            tl.store(scale_ptr + blk, m.to(tl.uint8), mask=blk * BLOCK_SIZE < n)
            s = 1.0 + m.to(tl.float32) / 128.0
            xb = tl.reshape(x, (TILE // BLOCK_SIZE, BLOCK_SIZE))
            y = tl.reshape(tl.math.div_rn(xb, s[:, None]), (TILE,))
        else:
            y = x
        bits = y.to(tl.uint32, bitcast=True)
        sign = bits >> 31
        mag = bits & 0x7FFFFFFF
        SHIFT: tl.constexpr = 23 - K
        mag = (mag + ((1 << (SHIFT - 1)) - 1) + ((mag >> SHIFT) & 1)) >> SHIFT
        mag = tl.minimum(mag, (254 << K) | ((1 << K) - 1))
        tl.store(sym_ptr + offs, (mag >> K).to(tl.uint8), mask=mask)
        codes = (sign << K) | (mag & ((1 << K) - 1))
        GROUPS: tl.constexpr = TILE // 8
        packed = pack_group(codes, K + 1, GROUPS)
        g = pid * GROUPS + tl.arange(0, GROUPS)[:, None]
        j = tl.arange(0, 8)[None, :]
        dst = g * (K + 1) + j
        tl.store(field_ptr + dst, packed, mask=(j < K + 1) & (dst < ((K + 1) * n + 7) // 8))


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use the torch path (device='cpu')")


_TILE = 1024


def tail_grid(programs: int, first_program: int) -> tuple[int] | None:
    """The launch grid of programs [first_program, programs), or None when that is empty.

    Launchers take ``first_program`` so that a test can run only the last programs of a very large
    tensor (the interpreter runs ~1 ms per program) and check indices past 2**31; 0 in production.
    """
    if not 0 <= first_program <= programs:
        raise ValueError(f"first_program must be in 0..{programs}, got {first_program}")
    rest = programs - first_program
    return (rest,) if rest else None


def out_bits_view(out: torch.Tensor) -> torch.Tensor:
    """The raw-bits view the merge kernels store through."""
    return out.view(torch.int32) if out.dtype == torch.float32 else out.view(torch.uint16)


def merge_triton(
    symbols: torch.Tensor,
    raw: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    first_program: int = 0,
) -> torch.Tensor:
    """Triton twin of :func:`planes.merge` (elements from ``first_program * 1024`` on, see
    tail_grid)."""
    _require_triton()
    n = symbols.numel()
    if out is None:
        out = torch.empty(n, dtype=dtype, device=symbols.device)
    grid = tail_grid(triton.cdiv(n, _TILE), first_program)
    if grid:
        _merge_kernel[grid](
            symbols,
            raw,
            symbols,
            out_bits_view(out),
            n,
            first_program,
            FMT=FMT_OF[dtype],
            K=0,
            BLOCK_SIZE=1,
            NORMALIZE=False,
            OUT=FMT_OF[dtype],
            TILE=_TILE,
        )
    return out


def lossy_merge_triton(
    symbols: torch.Tensor,
    field: torch.Tensor,
    scales: torch.Tensor | None,
    mantissa_bits: int,
    block_size: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    first_program: int = 0,
) -> torch.Tensor:
    """Triton twin of :func:`planes.lossy_merge` (elements from ``first_program * 1024`` on)."""
    _require_triton()
    n = symbols.numel()
    if out is None:
        out = torch.empty(n, dtype=dtype, device=symbols.device)
    grid = tail_grid(triton.cdiv(n, _TILE), first_program)
    if grid:
        _merge_kernel[grid](
            symbols,
            field,
            scales if scales is not None else symbols,
            out_bits_view(out),
            n,
            first_program,
            FMT=FMT_LOSSY,
            K=mantissa_bits,
            BLOCK_SIZE=block_size,
            NORMALIZE=scales is not None,
            OUT=FMT_OF[dtype],
            TILE=_TILE,
        )
    return out


def split_triton(x: torch.Tensor, *, first_program: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`planes.split` (elements from ``first_program * 1024`` on)."""
    _require_triton()
    flat = x.contiguous().reshape(-1)
    n = flat.numel()
    layout = lossless_layout(x.dtype)
    symbols = torch.empty(n, dtype=torch.uint8, device=x.device)
    raw = torch.empty(layout.raw_nbytes(n), dtype=torch.uint8, device=x.device)
    grid = tail_grid(triton.cdiv(n, _TILE), first_program)
    if grid is None:
        return symbols, raw
    src = flat.view(torch.int32) if x.dtype == torch.float32 else flat.view(torch.uint16)
    _split_kernel[grid](src, symbols, raw, n, first_program, FMT=FMT_OF[x.dtype], TILE=_TILE)
    if x.dtype == torch.float16:  # the 2-bit field m[9:8] = the low bits of the top byte
        hi2 = flat.view(torch.uint8).view(n, 2)[:, 1] & 0x3
        # a pack program covers 128 groups of 8 = _TILE codes: the same program numbers
        pack_bits_triton(hi2, 2, out=raw[n:], first_program=first_program)
    return symbols, raw


_PACK_GROUPS = 128  # groups of 8 codes per pack program: _TILE codes


def pack_bits_triton(
    codes: torch.Tensor, width: int, out: torch.Tensor | None = None, *, first_program: int = 0
) -> torch.Tensor:
    """Triton twin of :func:`planes.pack_bits` (codes from ``first_program * 1024`` on)."""
    _require_triton()
    if not 1 <= width <= 8:
        raise ValueError(f"width must be in 1..8, got {width}")
    n = codes.numel()
    if out is None:
        out = torch.empty(packed_nbytes(n, width), dtype=torch.uint8, device=codes.device)
    grid = tail_grid(triton.cdiv(n, _PACK_GROUPS * 8), first_program)
    if grid:
        _pack_kernel[grid](
            codes.contiguous(), out, n, first_program, WIDTH=width, GROUPS=_PACK_GROUPS
        )
    return out


def lossy_split_triton(
    x: torch.Tensor,
    mantissa_bits: int,
    block_size: int,
    normalize: bool = True,
    *,
    first_program: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton twin of :func:`planes.lossy_split` (from element
    ``first_program * max(1024, block_size)`` on; the scales are packed whole)."""
    _require_triton()
    flat = x.contiguous().reshape(-1)
    n = flat.numel()
    k = mantissa_bits
    symbols = torch.empty(n, dtype=torch.uint8, device=x.device)
    field = torch.empty(packed_nbytes(n, k + 1), dtype=torch.uint8, device=x.device)
    scales = (
        torch.empty(n_blocks(n, block_size), dtype=torch.uint8, device=x.device)
        if normalize
        else None
    )
    tile = max(_TILE, block_size)
    grid = tail_grid(triton.cdiv(n, tile), first_program)
    if grid:
        _lossy_split_kernel[grid](
            flat,
            symbols,
            field,
            scales if scales is not None else symbols,
            n,
            first_program,
            K=k,
            BLOCK_SIZE=block_size if normalize else 1,
            NORMALIZE=normalize,
            TILE=tile,
        )
    if scales is None:
        return symbols, field, None
    return symbols, field, pack_bits_triton(scales, SCALE_BITS)
