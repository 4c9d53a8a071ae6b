"""Inputs shared by a reference's tests and its Triton twin's (test_ans*.py, test_planes*.py)."""

from __future__ import annotations

import torch

from tests.helpers import all_bf16, all_fp16, fp32_specials_and_random

# Every bf16 and fp16 bit pattern; fp32's specials and 100,000 random patterns.
BIT_PATTERNS = {
    torch.bfloat16: all_bf16,
    torch.float16: all_fp16,
    torch.float32: lambda: fp32_specials_and_random(100_000),
}


def symbols(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    """uint8 [n] symbol planes of four shapes: one symbol, uniform, two symbols (99.9% one),
    and exponent-like (geometric around 120)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "single":
        return torch.full((n,), 123, dtype=torch.uint8)
    if kind == "uniform":
        return torch.randint(0, 256, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    if kind == "two":
        return (torch.rand(n, generator=g) < 0.999).to(torch.uint8) * 200
    # exponent-like: geometric around 120
    return (120 + torch.distributions.Geometric(0.4).sample((n,)).clamp(max=100)).to(torch.uint8)


def weights(n: int, seed: int = 0) -> torch.Tensor:
    """fp32 [n] in rows of 64 of very different scales, like trained weights."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(n // 64 + 1, generator=g) * 2).repeat_interleave(64)[:n]
    return torch.randn(n, generator=g) * scale * 0.02
