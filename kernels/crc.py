"""CRC-32 (zlib's: reflected polynomial 0xEDB88320, inverted in and out) of uint8 tensors, computed
where the bytes are.

``crc32(data, value)`` equals ``zlib.crc32(bytes(data), value)`` for a tensor on any device; on the
CPU it *is* zlib. On CUDA the bytes never leave the device:

1. ``_segment_crc_kernel`` computes, in parallel, the raw CRC register (start state 0, no inversion)
   of every SEG-byte segment. The data is treated as if left-padded with zeros to a whole number of
   segments: zero bytes fed to a zero register leave it zero, so the padding changes nothing.
2. A tree folds the segment registers pairwise. CRC is linear over GF(2):
   ``R(s, A || B) = Z_|B|(R(s, A)) xor R(0, B)`` where ``Z_m`` (feeding m zero bytes) is a 32x32
   GF(2) matrix, so on level L every pair needs the same matrix ``Z_{SEG * 2^L}``. A matrix is
   applied as four 256-entry byte tables (``Z(x) = T0[x0] ^ T1[x1] ^ T2[x2] ^ T3[x3]``, x_k the
   bytes of x), i.e. four gathers per level.
3. zlib's conditioning: ``crc32(data, v) = ~(Z_n(~v) xor R(0, data))``.

:func:`crc32_tensor` returns the result as a 0-d int64 tensor on the data's device without a host
sync (callers that compare on the device, or chain planes); :func:`crc32` returns a Python int and
so synchronizes once on CUDA.
"""

from __future__ import annotations

import functools
import logging
import zlib

import torch

from . import HAS_TRITON

log = logging.getLogger(__name__)

POLY = 0xEDB88320
MASK32 = 0xFFFFFFFF
DEFAULT_SEGMENT = 1024  # bytes per segment (one lane of the kernel walks one segment)
DEFAULT_BLOCK = 128  # segments per Triton program


# ---------------------------------------------------------------------------------------------
# GF(2) matrices on the host: a matrix is a tuple of 32 column ints, column j = M(1 << j)
# ---------------------------------------------------------------------------------------------


@functools.cache
def byte_table() -> tuple[int, ...]:
    """The 256-entry table of the reflected CRC-32: one byte's 8 shift-and-xor steps."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (POLY if c & 1 else 0)
        table.append(c)
    return tuple(table)


def _apply_columns(cols: tuple[int, ...], x: int) -> int:
    out = 0
    j = 0
    while x:
        if x & 1:
            out ^= cols[j]
        x >>= 1
        j += 1
    return out


def _tables_of(cols: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Four 256-entry tables: T[k][b] = M(b << 8k), built by linearity from the columns."""
    tables = []
    for k in range(4):
        t = [0] * 256
        for b in range(1, 256):
            low = b & -b  # lowest set bit: T[b] = T[b without it] ^ column of that bit
            t[b] = t[b ^ low] ^ cols[8 * k + low.bit_length() - 1]
        tables.append(tuple(t))
    return tuple(tables)


def _apply_tables(tables: tuple[tuple[int, ...], ...], x: int) -> int:
    return (
        tables[0][x & 0xFF]
        ^ tables[1][(x >> 8) & 0xFF]
        ^ tables[2][(x >> 16) & 0xFF]
        ^ tables[3][x >> 24]
    )


@functools.cache
def _zero_power_tables() -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Byte tables of Z_{2^k} (feed 2^k zero bytes) for k = 0..63, by repeated squaring."""
    t = byte_table()
    cols = tuple(((1 << j) >> 8) ^ t[(1 << j) & 0xFF] for j in range(32))  # Z_1
    out = []
    for _ in range(64):
        tables = _tables_of(cols)
        out.append(tables)
        cols = tuple(_apply_tables(tables, c) for c in cols)  # Z_{2m} = Z_m o Z_m
    return tuple(out)


def shift_zeros(x: int, nbytes: int) -> int:
    """Z_nbytes(x): the raw register x after ``nbytes`` zero bytes (host, O(log nbytes))."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    powers = _zero_power_tables()
    k = 0
    while nbytes:
        if nbytes & 1:
            x = _apply_tables(powers[k], x)
        nbytes >>= 1
        k += 1
    return x


def crc32_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """zlib.crc32(A || B) from crc_a = zlib.crc32(A), crc_b = zlib.crc32(B) and len(B)."""
    # ~crc_b = Z_lb(~0) ^ R(0, B) and ~crc_ab = Z_lb(~crc_a) ^ R(0, B): the ~0 and ~crc_a terms
    # differ by Z_lb(crc_a) (linearity), hence the formula.
    return shift_zeros(crc_a, len_b) ^ crc_b


# ---------------------------------------------------------------------------------------------
# device tables (built once per device from the host tables above)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _device_byte_table(device: torch.device) -> torch.Tensor:
    """The CRC byte table as int32 (bit patterns of the uint32 entries) on ``device``."""
    t = torch.tensor(byte_table(), dtype=torch.int64).to(torch.int32)  # wraps the high bit
    return t.to(device)


@functools.lru_cache(maxsize=16)
def _device_power_tables(device: torch.device) -> torch.Tensor:
    """int64 [64, 1024]: row k holds the four byte tables of Z_{2^k} (table j at 256 j)."""
    rows = [sum(tables, ()) for tables in _zero_power_tables()]
    return torch.tensor(rows, dtype=torch.int64).to(device)


def _apply_device(flat_tables: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M(x) for int64 x (values < 2^32, any shape) and M's four byte tables as int64 [1024]."""
    # aranges are made on the device (a tensor from a list would be a blocking upload)
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=x.device)
    idx = ((x.unsqueeze(-1) >> shifts) & 0xFF) + 32 * shifts  # table k starts at 256 k = 32 * 8k
    g = flat_tables[idx]  # [..., 4]
    return g[..., 0] ^ g[..., 1] ^ g[..., 2] ^ g[..., 3]


def _check_data(data: object, label: str = "data") -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(data).__name__}")
    if data.dtype != torch.uint8:
        raise TypeError(f"{label} must be a uint8 tensor, got {data.dtype}")
    return data.reshape(-1).contiguous()


def _check_pow2(v: int, label: str) -> None:
    if not isinstance(v, int) or v < 1 or v & (v - 1):
        raise ValueError(f"{label} must be a power of two, got {v!r}")


# ---------------------------------------------------------------------------------------------
# Triton kernel and launcher
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _segment_crc_kernel(
        data_ptr,  # *u8 [n]
        out_ptr,  # *i32 [n_segments]: raw register of each segment (uint32 bit pattern)
        table_ptr,  # *i32 [256]: the CRC byte table
        n,  # bytes of data
        pad,  # virtual zero bytes before the data: n_segments * SEG - n
        n_segments,
        SEG: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One lane per segment, BLOCK segments per program; a lane walks its SEG bytes in order.
        # Lanes of a warp read bytes SEG apart; each lane reuses its cache line for 128 steps.
        seg = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = seg < n_segments
        start = seg * SEG - pad  # int64 byte offset of the segment (negative inside the pad)
        crc = tl.zeros([BLOCK], dtype=tl.uint32)
        for j in range(SEG):
            pos = start + j
            ok = live & (pos >= 0) & (pos < n)
            b = tl.load(data_ptr + pos, mask=ok, other=0).to(tl.uint32)
            idx = ((crc ^ b) & 0xFF).to(tl.int32)
            t = tl.load(table_ptr + idx).to(tl.uint32, bitcast=True)
            crc = t ^ (crc >> 8)
        tl.store(out_ptr + seg, crc.to(tl.int32, bitcast=True), mask=live)


def segment_crcs_triton(
    data: torch.Tensor, segment: int = DEFAULT_SEGMENT, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """int64 [ceil(n / segment)]: raw registers (start 0) of the zero-left-padded segments."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use zlib on the host (crc32 on a CPU tensor)")
    flat = _check_data(data)
    _check_pow2(segment, "segment")
    _check_pow2(block, "block")
    n = flat.numel()
    n_seg = -(-n // segment)
    out = torch.empty(n_seg, dtype=torch.int32, device=flat.device)
    if n_seg:
        table = _device_byte_table(flat.device)
        grid = (triton.cdiv(n_seg, block),)
        _segment_crc_kernel[grid](
            flat, out, table, n, n_seg * segment - n, n_seg, SEG=segment, BLOCK=block
        )
    return out.to(torch.int64) & MASK32


def _fold(regs: torch.Tensor, segment: int) -> torch.Tensor:
    """0-d int64: the raw register of the concatenated segments (equal length ``segment``)."""
    if regs.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=regs.device)
    powers = _device_power_tables(regs.device)
    level = segment.bit_length() - 1  # Z_{segment * 2^L} = Z_{2^(log2 segment + L)}
    while regs.numel() > 1:
        if regs.numel() % 2:  # a zero segment in front: leading zeros leave a zero register
            regs = torch.cat([regs.new_zeros(1), regs])
        regs = _apply_device(powers[level], regs[0::2]) ^ regs[1::2]
        level += 1
    return regs[0]


def crc32_tensor(
    data: torch.Tensor,
    value: int | torch.Tensor = 0,
    *,
    segment: int = DEFAULT_SEGMENT,
    block: int = DEFAULT_BLOCK,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """zlib.crc32(data, value) as a 0-d int64 tensor on data's device, without a host sync.

    ``value`` chains like zlib's (an int, or a 0-d tensor from an earlier call on the same device).
    The Triton path runs for CUDA data (``use_triton`` forces it, e.g. on CPU tensors under
    TRITON_INTERPRET=1); otherwise zlib computes it on the host.
    """
    flat = _check_data(data)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"value must be a single CRC, got a tensor of {value.numel()} values")
    elif not isinstance(value, int) or not 0 <= value <= MASK32:
        raise ValueError(f"value must be an int in [0, 2**32) or a 0-d tensor, got {value!r}")
    triton_path = (HAS_TRITON and flat.device.type == "cuda") if use_triton is None else use_triton
    if not triton_path:
        if flat.device.type == "cuda":
            log.debug("crc32 of %d CUDA bytes on the host: Triton is not installed", flat.numel())
        v = int(value) if isinstance(value, torch.Tensor) else value
        crc = zlib.crc32(flat.cpu().numpy(), v)
        return torch.tensor(crc, dtype=torch.int64, device=flat.device)
    n = flat.numel()
    raw = _fold(segment_crcs_triton(flat, segment, block), segment)
    if isinstance(value, torch.Tensor):
        # Z_n(~v) on the device: the byte tables of Z_n are built on the host (no data needed)
        # and uploaded without waiting on the device.
        cols = tuple(shift_zeros(1 << j, n) for j in range(32))
        tables = torch.tensor(sum(_tables_of(cols), ()), dtype=torch.int64)
        if flat.device.type == "cuda":
            tables = tables.pin_memory()
        tables = tables.to(flat.device, non_blocking=True)
        v = value.reshape(()).to(device=flat.device, dtype=torch.int64) & MASK32
        return (_apply_device(tables, v ^ MASK32) ^ raw) ^ MASK32
    return (raw ^ shift_zeros(value ^ MASK32, n)) ^ MASK32


def crc32(data: torch.Tensor, value: int = 0) -> int:
    """zlib.crc32(data, value) for a uint8 tensor on any device (one host sync on CUDA)."""
    flat = _check_data(data)
    if flat.device.type == "cpu":
        if not isinstance(value, int) or not 0 <= value <= MASK32:
            raise ValueError(f"value must be an int in [0, 2**32), got {value!r}")
        return zlib.crc32(flat.numpy(), value)
    return int(crc32_tensor(flat, value))
