"""Settings, as frozen dataclasses validated when they are made."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .kernels import ans, zstd

MODES = ("lossless", "lossy")
CODECS = ("ans", "zstd")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _power_of_two(v: object) -> bool:
    return _is_int(v) and v > 0 and (v & (v - 1)) == 0


@dataclass(frozen=True)
class CodecConfig:
    """How tensors are compressed.

    mode: "lossless" (exponents entropy-coded, everything else raw) or "lossy" (NeuZip's block
        normalization, then ``mantissa_bits`` mantissa bits kept with round-to-nearest).
    codec: "ans" (GPU decoding) or "zstd" (CPU decoding); None picks by the device that decodes.
    mantissa_bits: 0..7, lossy only. block_size: weights per normalization block, a power of two.
    normalize: lossy only; False keeps plain rounding (k=7 then equals lossless for bf16).
    chunk_size: symbols per rANS chunk / zstd frame (None: the codec's default).
    lanes, prob_bits: rANS lanes per chunk and probability precision.
    """

    mode: str = "lossless"
    codec: str | None = None
    mantissa_bits: int = 3
    block_size: int = 512
    normalize: bool = True
    chunk_size: int | None = None
    lanes: int = ans.DEFAULT_LANES
    prob_bits: int = ans.DEFAULT_PROB_BITS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.codec is not None and self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS} or None, got {self.codec!r}")
        if not _is_int(self.mantissa_bits) or not 0 <= self.mantissa_bits <= 7:
            raise ValueError(f"mantissa_bits must be an int in 0..7, got {self.mantissa_bits!r}")
        if not _power_of_two(self.block_size):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size!r}")
        if self.block_size > 1 << 24:  # the GPU decoder counts 8 blocks + a chunk in int32
            raise ValueError(f"block_size must be at most 2**24, got {self.block_size}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")
        if not _power_of_two(self.lanes) or self.lanes > ans.MAX_LANES:
            raise ValueError(
                f"lanes must be a power of two up to {ans.MAX_LANES} (the GPU codec keeps a "
                f"chunk's lanes in one warp, {ans.MAX_LANES // 32} states per thread at most), "
                f"got {self.lanes!r}"
            )
        if not _is_int(self.prob_bits) or not 8 <= self.prob_bits <= 12:
            raise ValueError(f"prob_bits must be an int in 8..12, got {self.prob_bits!r}")
        if self.chunk_size is not None:
            if not _power_of_two(self.chunk_size) or self.chunk_size < self.lanes:
                raise ValueError(
                    f"chunk_size must be a power of two >= lanes ({self.lanes}), "
                    f"got {self.chunk_size!r}"
                )
            if self.chunk_size > 1 << 24:
                raise ValueError(f"chunk_size must be at most 2**24, got {self.chunk_size}")

    def for_device(self, device: torch.device | str) -> CodecConfig:
        """The same settings with the codec resolved for where decoding runs."""
        if self.codec is not None:
            return self
        kind = torch.device(device).type
        return replace(self, codec="ans" if kind == "cuda" else "zstd")

    @property
    def resolved_chunk_size(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return zstd.DEFAULT_FRAME if self.codec == "zstd" else ans.DEFAULT_CHUNK
