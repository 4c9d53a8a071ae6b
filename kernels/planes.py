"""Floats ⇄ planes: the exponent *symbols* that get entropy-coded, and the raw bits beside them.

Lossless layouts (little-endian byte views of the float; n = number of weights)::

    dtype  symbol (bits used)      raw plane, in this order
    bf16   exponent (8)            n bytes   sign<<7 | m[6:0]
    fp32   exponent (8)            n bytes m[7:0], n bytes m[15:8], n bytes sign<<7 | m[22:16]
    fp16   sign<<5 | exponent (6)  n bytes m[7:0], then m[9:8] as a packed 2-bit field

fp16 keeps its sign in the symbol so that the raw part is 10 bits (8 + a 2-bit field) instead of 11.
The bf16 and fp32 merges are byte operations: the float's top byte is ``(raw & 0x80) | (sym >> 1)``
and the byte below it ``(sym << 7) | (raw & 0x7F)`` (uint8 shifts drop the bits that fall off).

Lossy (NeuZip's block-wise normalization, any input dtype, values as bf16 after decoding)::

    per block of ``block_size`` weights: s = 1.m, m = the top 7 mantissa bits of the block absmax
    y = x / s in fp32, rounded to k mantissa bits (round to nearest, ties to even)
    symbol = exponent of y (8 bits); raw = a packed (1 + k)-bit field sign<<k | top k bits of y
    m per block, packed 7 bits each; decoding computes y * s in fp32, rounding once to the output

A block's absmax is 2^e * s, so y = 2^e exactly: the absmax survives rounding and decodes exactly.

Packed bit fields (``pack_bits``): element i, w bits wide, sits in the w-byte group i // 8 at bit
(i % 8) * w, little-endian; so a field spans at most two bytes and a group is w bytes.

The functions here are the torch references and the CPU path; their Triton twins, tested against
them bit for bit, are in planes_triton.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

assert sys.byteorder == "little", "the plane layouts assume a little-endian host"

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Layout:
    """How one dtype splits: symbol width, whole raw bytes per weight, packed field width."""

    symbol_bits: int
    raw_bytes: int
    field_bits: int

    def raw_nbytes(self, n: int) -> int:
        return self.raw_bytes * n + packed_nbytes(n, self.field_bits)


LOSSLESS_LAYOUTS = {
    torch.bfloat16: Layout(symbol_bits=8, raw_bytes=1, field_bits=0),
    torch.float32: Layout(symbol_bits=8, raw_bytes=3, field_bits=0),
    torch.float16: Layout(symbol_bits=6, raw_bytes=1, field_bits=2),
}


def lossless_layout(dtype: torch.dtype) -> Layout:
    return LOSSLESS_LAYOUTS[dtype]


def lossy_layout(mantissa_bits: int) -> Layout:
    return Layout(symbol_bits=8, raw_bytes=0, field_bits=1 + mantissa_bits)


def packed_nbytes(n: int, width: int) -> int:
    """Bytes of a packed field of ``n`` values, ``width`` bits each: ceil(n * width / 8)."""
    return (n * width + 7) // 8


def n_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


# ---------------------------------------------------------------------------------------------
# torch references (the CPU path; also what the Triton kernels are tested against)
# ---------------------------------------------------------------------------------------------


def _bytes_view(x: torch.Tensor) -> torch.Tensor:
    """[n, itemsize] uint8 view of a contiguous 1-D float tensor."""
    return x.view(torch.uint8).view(x.numel(), x.element_size())


def _field_positions(width: int):
    """For each of the 8 values of a group: (byte, shift, spills into the next byte)."""
    for p in range(8):
        bit = p * width
        yield p, bit >> 3, bit & 7, (bit & 7) + width > 8


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (each < 2**width) into ceil(n * width / 8) bytes.

    Byte operations on the [groups, 8] view of the codes: each of the 8 positions of a group ORs
    its bits into one byte of the group, or two when it straddles a byte boundary.
    """
    if not 1 <= width <= 8:
        raise ValueError(f"width must be in 1..8, got {width}")
    n = codes.numel()
    if width == 8:
        return codes.reshape(-1).clone()
    groups = (n + 7) // 8
    c = torch.zeros(groups * 8, dtype=torch.uint8, device=codes.device)
    c[:n] = codes.reshape(-1)
    c = c.view(groups, 8)
    grid = torch.zeros(groups, width, dtype=torch.uint8, device=codes.device)
    for p, byte, shift, spills in _field_positions(width):
        grid[:, byte] |= c[:, p] << shift
        if spills:
            grid[:, byte + 1] |= c[:, p] >> (8 - shift)
    return grid.reshape(-1)[: packed_nbytes(n, width)]


def unpack_bits(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values, as uint8."""
    if width == 8:
        return packed[:n]
    groups = (n + 7) // 8
    need = packed_nbytes(n, width)
    if groups * width == need:
        grid = packed[:need].view(groups, width)
    else:  # the last group is cut short: pad it
        grid = torch.zeros(groups * width, dtype=torch.uint8, device=packed.device)
        grid[:need] = packed[:need]
        grid = grid.view(groups, width)
    mask = (1 << width) - 1
    if 8 % width == 0:  # fields never straddle: one shift and mask per field of a byte
        per = 8 // width
        flat = grid.reshape(-1)
        out = torch.empty(flat.numel(), per, dtype=torch.uint8, device=packed.device)
        for i in range(per):
            torch.bitwise_and(flat >> (i * width), mask, out=out[:, i])
        return out.reshape(-1)[:n]
    out = torch.empty(groups, 8, dtype=torch.uint8, device=packed.device)
    for p, byte, shift, spills in _field_positions(width):
        v = grid[:, byte] >> shift
        if spills:
            v = v | (grid[:, byte + 1] << (8 - shift))
        torch.bitwise_and(v, mask, out=out[:, p])
    return out.reshape(-1)[:n]


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless split of a float tensor into (symbols [n] uint8, raw plane uint8)."""
    if x.dtype not in LOSSLESS_LAYOUTS:
        raise TypeError(f"x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    flat = x.contiguous().reshape(-1)
    if flat.device.type == "cpu":
        return _split_host(flat)
    return _split_torch(flat)


def _split_torch(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte operations in torch (any device)."""
    n = flat.numel()
    b = _bytes_view(flat)
    if flat.dtype == torch.float16:
        lo, hi = b[:, 0], b[:, 1]
        return hi >> 2, torch.cat([lo, pack_bits(hi & 0x3, 2)])
    lo, hi = b[:, -2], b[:, -1]  # the two bytes holding sign, exponent and top mantissa bits
    symbols = (hi << 1) | (lo >> 7)
    top = (hi & 0x80) | (lo & 0x7F)
    if flat.dtype == torch.bfloat16:
        return symbols, top.clone()
    raw = torch.empty(3 * n, dtype=torch.uint8, device=flat.device)
    raw.view(3, n)[0] = b[:, 0]
    raw.view(3, n)[1] = b[:, 1]
    raw.view(3, n)[2] = top
    return symbols, raw


_HOST_PIECE = 1 << 20  # elements per pass of the host split: bounds its temporaries to ~4 MB


def _split_host(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same on the CPU, as numpy operations on 16-bit words: 2.4x faster single-threaded
    (conversion workers run one thread each); results are identical (tested). Works through the
    tensor in pieces of ``_HOST_PIECE`` elements, so that re-encoding a large weight during
    training needs little beyond its two output planes."""
    n = flat.numel()
    u = flat.view(torch.int16).numpy().view(np.uint16)
    half = flat.dtype == torch.float16
    symbols = np.empty(n, dtype=np.uint8)
    if half:
        raw = np.empty(n + (2 * n + 7) // 8, dtype=np.uint8)
        hi2 = np.empty(n, dtype=np.uint8)
    elif flat.dtype == torch.bfloat16:
        raw = np.empty(n, dtype=np.uint8)
    else:
        raw = np.empty((3, n), dtype=np.uint8)
    step = 2 if flat.dtype == torch.float32 else 1
    tmp = np.empty(min(n, _HOST_PIECE), dtype=np.uint16)
    for a in range(0, n, _HOST_PIECE):
        b = min(n, a + _HOST_PIECE)
        t = tmp[: b - a]
        if half:
            w = u[a:b]
            np.right_shift(w, 10, out=t)
            symbols[a:b] = t  # sign << 5 | exponent
            np.right_shift(w, 8, out=t)
            t &= 0x3
            hi2[a:b] = t
            raw[a:b] = w  # the low byte (astype keeps the low 8 bits)
            continue
        hi = u[2 * a + 1 : 2 * b : 2] if step == 2 else u[a:b]  # fp32: the upper half-word
        np.right_shift(hi, 7, out=t)
        symbols[a:b] = t  # the sign bit lands on bit 8 and is cut off
        np.right_shift(hi, 8, out=t)
        t &= 0x80
        top = raw[a:b] if step == 1 else raw[2, a:b]
        top[:] = t
        np.bitwise_and(hi, 0x7F, out=t)
        top |= t.astype(np.uint8)
        if step == 2:
            low = u[2 * a : 2 * b : 2]
            raw[0, a:b] = low
            np.right_shift(low, 8, out=t)
            raw[1, a:b] = t
    if half:
        raw[n:] = pack_bits(torch.from_numpy(hi2), 2).numpy()
    return torch.from_numpy(symbols), torch.from_numpy(raw.reshape(-1))


def merge(
    symbols: torch.Tensor,
    raw: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    start: int = 0,
    total: int | None = None,
) -> torch.Tensor:
    """Inverse of :func:`split`, into the 1-D ``out`` when given.

    ``symbols`` may be elements [start, start + len) of a tensor of ``total`` elements whose whole
    raw plane is ``raw`` (``start`` a multiple of 8), so frames can be merged as they decode.
    """
    n = symbols.numel()
    total = n if total is None else total
    if out is None:
        out = torch.empty(n, dtype=dtype, device=symbols.device)
    b = _bytes_view(out)
    if dtype == torch.float16:
        b[:, 0] = raw[start : start + n]
        g0 = start // 8 * 2
        hi2 = unpack_bits(raw[total + g0 : total + g0 + packed_nbytes(n, 2)], 2, n)
        torch.bitwise_or(symbols << 2, hi2, out=b[:, 1])
        return out
    top_at = 0 if dtype == torch.bfloat16 else 2 * total
    top = raw[top_at + start : top_at + start + n]
    torch.bitwise_or(top & 0x80, symbols >> 1, out=b[:, -1])
    torch.bitwise_or(symbols << 7, top & 0x7F, out=b[:, -2])
    if dtype == torch.float32:
        b[:, 0] = raw[start : start + n]
        b[:, 1] = raw[total + start : total + start + n]
    return out


def _block_view(v: torch.Tensor, block_size: int, fill: float = 0.0) -> torch.Tensor:
    n = v.numel()
    nb = n_blocks(n, block_size)
    if nb * block_size == n:
        return v.view(nb, block_size)
    padded = torch.full((nb * block_size,), fill, dtype=v.dtype, device=v.device)
    padded[:n] = v
    return padded.view(nb, block_size)


SCALE_BITS = 7


def block_scales(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """m per block (uint8): the top 7 mantissa bits of the block's absmax (0 for zero/subnormal)."""
    xf = x.reshape(-1).float()
    absmax = _block_view(xf.abs(), block_size).amax(dim=1)
    bits = absmax.view(torch.int32)
    m = (bits >> 16) & 0x7F
    normal = ((bits >> 23) & 0xFF) != 0
    return torch.where(normal, m, torch.zeros_like(m)).to(torch.uint8)


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """s = 1 + m / 128 per block, exact in fp32."""
    return 1.0 + scales.float() / 128.0


def lossy_split(
    x: torch.Tensor, mantissa_bits: int, block_size: int, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Lossy split: (symbols [n], packed (1+k)-bit field, packed 7-bit scales or None).

    The caller guarantees finite values and 0 <= k <= 7.
    """
    k = mantissa_bits
    xf = x.reshape(-1).float()
    n = xf.numel()
    scales = None
    if normalize:
        scales = block_scales(xf, block_size)
        s = scale_values(scales)
        y = (_block_view(xf, block_size) / s[:, None]).reshape(-1)[:n]
    else:
        y = xf
    bits = y.contiguous().view(torch.int32)
    sign = (bits >> 31) & 1
    mag = bits & 0x7FFFFFFF
    shift = 23 - k  # round the fp32 mantissa to k bits, ties to even; carries reach the exponent
    mag = (mag + ((1 << (shift - 1)) - 1) + ((mag >> shift) & 1)) >> shift
    mag = mag.clamp_(max=(254 << k) | ((1 << k) - 1))  # saturate at the largest finite value
    symbols = (mag >> k).to(torch.uint8)
    codes = ((sign << k) | (mag & ((1 << k) - 1))).to(torch.uint8)
    packed_scales = pack_bits(scales, SCALE_BITS) if scales is not None else None
    return symbols, pack_bits(codes, 1 + k), packed_scales


def lossy_merge(
    symbols: torch.Tensor,
    field: torch.Tensor,
    scales: torch.Tensor | None,
    mantissa_bits: int,
    block_size: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Inverse of :func:`lossy_split` up to its rounding; result in ``dtype``.

    As in :func:`merge`, ``symbols`` may start at element ``start`` of the tensor (a multiple of 8
    and, with scales, of ``block_size``); ``field`` and ``scales`` are the tensor's whole planes.
    """
    k = mantissa_bits
    n = symbols.numel()
    g0 = start // 8 * (k + 1)
    codes = unpack_bits(field[g0 : g0 + packed_nbytes(n, k + 1)], 1 + k, n)
    y = torch.empty(n, dtype=torch.bfloat16, device=symbols.device)
    b = _bytes_view(y)
    torch.bitwise_or((codes >> k) << 7, symbols >> 1, out=b[:, 1])
    torch.bitwise_or(symbols << 7, (codes & ((1 << k) - 1)) << (7 - k), out=b[:, 0])
    if out is None:
        out = torch.empty(n, dtype=dtype, device=symbols.device)
    if scales is None:
        out.copy_(y)
        return out
    b0 = start // block_size  # a multiple of 8 when start is a multiple of 8 * block_size
    g0 = (b0 // 8) * SCALE_BITS
    m = unpack_bits(scales[g0:], SCALE_BITS, b0 % 8 + n_blocks(n, block_size))[b0 % 8 :]
    s = scale_values(m)
    prod = (_block_view(y.float(), block_size) * s[:, None]).reshape(-1)[:n]
    out.copy_(prod)  # the one rounding to the output dtype (none for fp32: the product is exact)
    return out


# Format codes the Triton kernels take as constexpr (planes_triton.py, ans_triton.py).
FMT_BF16, FMT_FP16, FMT_FP32, FMT_LOSSY = 0, 1, 2, 3
FMT_OF = {torch.bfloat16: FMT_BF16, torch.float16: FMT_FP16, torch.float32: FMT_FP32}
