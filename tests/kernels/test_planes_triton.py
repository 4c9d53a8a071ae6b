"""kernels/planes_triton.py: split/merge and lossy pack/unpack kernels against planes.py."""

from __future__ import annotations

import pytest
import torch

from neuzip_offload.kernels import planes, planes_triton
from tests.helpers import TRITON_DEVICE, requires_triton, same_bits
from tests.kernels.inputs import BIT_PATTERNS, weights

pytestmark = requires_triton


@pytest.mark.parametrize("dtype", list(BIT_PATTERNS))
def test_triton_split_and_merge_match_reference(dtype):
    x = BIT_PATTERNS[dtype]()[::7][:5000].to(TRITON_DEVICE)
    sym, raw = planes.split(x)
    tsym, traw = planes_triton.split_triton(x)
    assert torch.equal(sym, tsym) and torch.equal(raw, traw)
    assert same_bits(planes_triton.merge_triton(sym, raw, dtype), x)


@pytest.mark.parametrize("width", [2, 3, 7])
def test_triton_pack_matches_reference(width):
    codes = torch.randint(0, 1 << width, (1001,), dtype=torch.int64).to(torch.uint8)
    codes = codes.to(TRITON_DEVICE)
    assert torch.equal(planes_triton.pack_bits_triton(codes, width), planes.pack_bits(codes, width))


@pytest.mark.parametrize(
    ("k", "block_size", "normalize"),
    [(0, 512, True), (3, 64, True), (7, 512, False), (5, 1024, True)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_lossy_matches_reference(k, block_size, normalize, dtype):
    x = weights(3000, seed=k).to(dtype).to(TRITON_DEVICE)
    ref = planes.lossy_split(x, k, block_size, normalize)
    got = planes_triton.lossy_split_triton(x, k, block_size, normalize)
    for a, b in zip(ref, got, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    y_ref = planes.lossy_merge(*ref, k, block_size, dtype)
    y_tri = planes_triton.lossy_merge_triton(*ref, k, block_size, dtype)
    assert same_bits(y_ref, y_tri)
