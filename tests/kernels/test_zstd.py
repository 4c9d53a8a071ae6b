"""kernels/zstd.py: independent frames, decoded in a pool."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zstandard

from neuzip_offload.kernels import zstd


@pytest.mark.parametrize("n", [0, 1, 1000, 5000])
@pytest.mark.parametrize("use_pool", [False, True])
def test_frames_round_trip(n, use_pool):
    sym = (120 + torch.randint(0, 9, (n,))).to(torch.uint8)
    with ThreadPoolExecutor(2) as pool:
        stream, offsets = zstd.encode(sym, 1024, pool if use_pool else None)
        assert offsets.numel() == (n + 1023) // 1024 + 1
        assert zstd.validate(stream, offsets, n, 1024) is None
        out = torch.empty(n, dtype=torch.uint8)
        starts = [a for a, _ in zstd.decode(stream, offsets, out, 1024, pool if use_pool else None)]
    assert torch.equal(out, sym)
    assert starts == list(range(0, n, 1024))


def test_exponent_like_symbols_compress_to_their_entropy():
    sym = (120 + torch.distributions.Geometric(0.4).sample((1 << 18,)).clamp(max=100)).to(
        torch.uint8
    )
    stream, _ = zstd.encode(sym)
    p = torch.bincount(sym.long(), minlength=256).double() / sym.numel()
    h = float(-(p[p > 0] * p[p > 0].log2()).sum())
    ours = 8 * stream.numel() / sym.numel()
    assert ours < h + 0.2  # Huffman-coded literals: within a fraction of a bit of the entropy
    level1 = 8 * len(zstandard.ZstdCompressor(level=1).compress(sym.numpy())) / sym.numel()
    assert ours < level1


def test_damaged_frame_raises():
    sym = torch.randint(0, 5, (3000,)).to(torch.uint8)
    stream, offsets = zstd.encode(sym, 1024)
    stream[int(offsets[1]) + 3] ^= 0xFF
    out = torch.empty(3000, dtype=torch.uint8)
    # byte 3 of frame 1 is its frame descriptor: zstd itself refuses the frame
    with pytest.raises(zstandard.ZstdError, match="frame descriptor"):
        list(zstd.decode(stream, offsets, out, 1024))
    # an intact frame that holds more symbols than its slot: our own size check names it
    good, good_offsets = zstd.encode(sym, 1024)
    with pytest.raises(ValueError, match="frame 0 does not hold exactly 1000 symbols"):
        list(zstd.decode(good, good_offsets, out, 1000))
    assert "offsets" in zstd.validate(stream, offsets.flip(0), 3000, 1024)
