"""kernels/planes.py: split/merge and lossy pack/unpack, the references (Triton twins:
test_planes_triton.py)."""

from __future__ import annotations

import pytest
import torch

from neuzip_offload.kernels import planes
from tests.helpers import all_bf16, same_bits
from tests.kernels.inputs import BIT_PATTERNS, weights


@pytest.mark.parametrize("dtype", list(BIT_PATTERNS))
def test_split_merge_round_trips_every_pattern(dtype):
    x = BIT_PATTERNS[dtype]()
    sym, raw = planes.split(x)
    layout = planes.lossless_layout(dtype)
    assert sym.dtype == torch.uint8 and sym.numel() == x.numel()
    assert int(sym.max()) < (1 << layout.symbol_bits)
    assert raw.numel() == layout.raw_nbytes(x.numel())
    assert same_bits(planes.merge(sym, raw, dtype), x)


@pytest.mark.parametrize("dtype", list(BIT_PATTERNS))
def test_host_and_torch_splits_agree(dtype):
    x = BIT_PATTERNS[dtype]()
    host = planes._split_host(x.contiguous().reshape(-1))
    generic = planes._split_torch(x.contiguous().reshape(-1))
    assert torch.equal(host[0], generic[0]) and torch.equal(host[1], generic[1])


@pytest.mark.parametrize("dtype", list(BIT_PATTERNS))
def test_host_split_in_pieces_agrees(dtype, monkeypatch):
    """The host split works in bounded pieces; a ragged last piece changes nothing."""
    monkeypatch.setattr(planes, "_HOST_PIECE", 1000)
    x = BIT_PATTERNS[dtype]().contiguous().reshape(-1)[:12_345]
    host = planes._split_host(x)
    generic = planes._split_torch(x)
    assert torch.equal(host[0], generic[0]) and torch.equal(host[1], generic[1])


@pytest.mark.parametrize("dtype", list(BIT_PATTERNS))
def test_merge_by_frames_equals_whole(dtype):
    """Merging pieces (as zstd frames arrive) writes exactly what one merge writes."""
    x = BIT_PATTERNS[dtype]()[:50_000]
    sym, raw = planes.split(x)
    out = torch.empty_like(x)
    for start in range(0, x.numel(), 4096):
        piece = sym[start : start + 4096]
        planes.merge(
            piece, raw, dtype, out=out[start : start + piece.numel()], start=start, total=x.numel()
        )
    assert same_bits(out, x)


def test_bf16_symbol_is_the_exponent():
    x = torch.tensor([1.0, 2.0, 0.5, -3.0, 0.0], dtype=torch.bfloat16)
    sym, raw = planes.split(x)
    assert sym.tolist() == [127, 128, 126, 128, 0]
    assert raw.tolist() == [0, 0, 0, 0x80 | 0x40, 0]


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_bits_round_trip(width, n):
    codes = torch.randint(0, 1 << width, (n,), dtype=torch.int64).to(torch.uint8)
    packed = planes.pack_bits(codes, width)
    assert packed.numel() == planes.packed_nbytes(n, width)
    assert torch.equal(planes.unpack_bits(packed, width, n), codes)


def test_pack_bits_layout_is_little_endian_groups_of_eight():
    # three-bit fields 0..7 in one group: bits 000 100 010 110 001 101 011 111 (LSB first)
    packed = planes.pack_bits(torch.arange(8, dtype=torch.uint8), 3)
    value = int.from_bytes(bytes(packed.tolist()), "little")
    assert [(value >> (3 * i)) & 7 for i in range(8)] == list(range(8))


def test_pack_bits_rejects_bad_width():
    with pytest.raises(ValueError, match="width"):
        planes.pack_bits(torch.zeros(4, dtype=torch.uint8), 9)


@pytest.mark.parametrize("k", range(8))
@pytest.mark.parametrize("block_size", [1, 64, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_lossy_error_bound_and_exact_block_absmax(k, block_size, dtype):
    x = weights(20_000, seed=k).to(dtype)
    sym, field, scales = planes.lossy_split(x, k, block_size, True)
    y = planes.lossy_merge(sym, field, scales, k, block_size, dtype)
    xf, yf = x.float(), y.float()
    # relative bounds hold away from the subnormal range of the output dtype
    normal = xf.abs() >= 2 * torch.finfo(dtype).tiny
    rel = ((yf - xf).abs() / xf.abs())[normal]
    out_rounding = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}[dtype]
    in_rounding = 2.0**-8 if dtype != torch.bfloat16 else 0.0  # absmax's mantissa is truncated
    bound = 2.0 ** -(k + 1) * (1 + in_rounding) + out_rounding + 2.0**-20
    assert float(rel.max()) <= bound
    assert torch.equal(torch.sign(yf), torch.sign(xf))
    if dtype == torch.bfloat16:  # the absmax of every block comes back exactly
        nb = planes.n_blocks(x.numel(), block_size)
        pad = nb * block_size - x.numel()
        xa = torch.cat([xf.abs(), xf.new_zeros(pad)]).view(nb, block_size)
        ya = torch.cat([yf.abs(), yf.new_zeros(pad)]).view(nb, block_size)
        assert torch.equal(xa.amax(dim=1), ya.amax(dim=1))


def test_lossy_k7_without_normalization_is_lossless_for_bf16():
    x = all_bf16()
    x = x[torch.isfinite(x)]
    sym, field, scales = planes.lossy_split(x, 7, 512, False)
    assert scales is None
    assert same_bits(planes.lossy_merge(sym, field, None, 7, 512, torch.bfloat16), x)


def test_lossy_rounds_to_nearest_even():
    # 1 + 3/16 with k=3 is a tie between 1.125 and 1.25: ties go to the even mantissa (1.25)
    x = torch.tensor([1.0 + 3 / 16, 1.0 + 1 / 16, 1.0 + 1 / 32 + 1 / 16], dtype=torch.float32)
    sym, field, _ = planes.lossy_split(x, 3, 512, False)
    y = planes.lossy_merge(sym, field, None, 3, 512, torch.float32)
    assert y.tolist() == [1.25, 1.0, 1.125]


def test_lossy_saturates_instead_of_overflowing():
    x = torch.tensor([3.3895313892515355e38, -3.3895313892515355e38])  # bf16's largest finite
    sym, field, _ = planes.lossy_split(x, 0, 512, False)
    y = planes.lossy_merge(sym, field, None, 0, 512, torch.float32)
    assert bool(torch.isfinite(y).all())
