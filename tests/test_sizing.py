"""sizing.unencoded: the header compress() would write, with the coded exponents estimated from
their histogram, checked against the encoder itself."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload import sizing
from neuzip_offload.config import CodecConfig


def _weights(dtype: torch.dtype) -> list[torch.Tensor]:
    """Weight-like tensors: Gaussian of a few scales, sizes off the chunk grid, and one flat."""
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(n, generator=g) * s for n, s in ((70_001, 0.02), (300_000, 1.0))]
    return [t.to(dtype) for t in out] + [torch.full((4096,), 0.5, dtype=dtype)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("codec", "lanes"), [("ans", 64), ("ans", 32), ("zstd", 64)])
def test_a_stand_in_has_the_encoders_header_but_for_the_coded_exponents(dtype, codec, lanes):
    cfg = CodecConfig(codec=codec, lanes=lanes)
    for w in _weights(dtype):
        real = nzo.compress(w, config=cfg)
        est = sizing.unencoded(w, cfg, "w")
        assert est.device.type == "meta" and est.name == "w"
        h = est.header
        exact = replace(real.header, exp_nbytes=h.exp_nbytes, crc=0)
        if codec == "zstd":
            assert h.table_len == 0
        assert h == exact  # ans: the table length too is exact
        assert {k: p.numel() for k, p in est.planes.items()} == h.plane_sizes()
        if codec == "ans":  # the table's own cost: within a fraction of a percent
            assert h.exp_nbytes == pytest.approx(real.header.exp_nbytes, rel=0.005, abs=64)
        else:  # Shannon entropy: zstd's Huffman literals cost a little more
            assert 0.9 * real.header.exp_nbytes - 64 <= h.exp_nbytes <= real.header.exp_nbytes


def test_chunk_counts_are_each_chunks_histogram():
    g = torch.Generator().manual_seed(1)
    sym = torch.randint(0, 256, (10_000,), generator=g, dtype=torch.int32).to(torch.uint8)
    counts = sizing.chunk_counts(sym, 4096)
    assert counts.shape == (3, 256) and counts.dtype == torch.int64
    for c, part in enumerate(sym.split(4096)):
        assert torch.equal(counts[c], torch.bincount(part.to(torch.int64), minlength=256))
    assert sizing.chunk_counts(sym[:0], 4096).shape == (0, 256)


def test_stand_ins_are_for_lossless_settings_with_a_codec():
    w = torch.randn(100)
    with pytest.raises(ValueError, match="lossless"):
        sizing.unencoded(w, CodecConfig(mode="lossy", codec="ans"))
    with pytest.raises(ValueError, match="codec resolved"):
        sizing.unencoded(w, CodecConfig())
