"""What compressing a tensor would give, without compressing it: its header, sizes estimated.

Dispatch asks this of the weights a lossless plan may keep decoded on the device (planning.py):
those are decoded at once, so encoding them would only cost time. The planner still needs
every block's compressed size, so each tensor gets a stand-in: the header ``compress`` would
write (dtype, shape, codec settings, the number of chunks and so every index plane exactly),
with its planes on the meta device and two fields estimated from the exponent histogram:

    exp_nbytes  ans: each chunk's symbols coded with the table the encoder would build
                (ans.normalize_counts), i.e. sum(count * log2(M / freq)) bits, in 16-bit words;
                within a fraction of a percent of the encoder's output (it also keeps ~8 bits a
                lane in its final states). zstd: the Shannon entropy of each frame, an estimate
                (zstd's Huffman literals cost a little more).
    table_len   ans: exact (each chunk's table spans its lowest to its highest symbol).

The raw plane is exact (it is the bits kept as they are). ``crc`` is 0: a stand-in has no bytes
to check, and nothing can decode it (its planes are on meta).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .compressed import CompressedTensor, Header
from .config import CodecConfig
from .kernels import ans, planes


def chunk_counts(symbols: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Histogram of each chunk of ``chunk_size`` symbols (uint8, CPU): int64 [C, 256].

    numpy's bincount on each chunk's bytes: no wider temporaries (torch's bincount converts
    a uint8 input, ~10x slower here)."""
    a = symbols.reshape(-1).numpy()
    rows = [np.bincount(a[i : i + chunk_size], minlength=256) for i in range(0, a.size, chunk_size)]
    if not rows:
        return torch.zeros(0, 256, dtype=torch.int64)
    return torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))


_STATE_PAYLOAD_BITS = 8.0  # coded bits a rANS lane's final state holds, on average


def _ans_sizes(counts: torch.Tensor, prob_bits: int, lanes: int) -> tuple[int, int]:
    """(exp plane bytes, table entries) of rANS-coded chunks with these histograms.

    The coded bits go to the words but for what the lanes' final states keep: each lane starts
    at x = 2**16 and ends with log2(x) in [16, 32), about 8 bits of payload on average (x near
    log-uniform) once it has coded a few symbols; the states are stored apart (the meta plane).
    """
    if counts.numel() == 0:
        return 0, 0
    freq = ans.normalize_counts(counts, prob_bits)
    present = counts > 0
    cost = torch.where(present, prob_bits - torch.log2(freq.clamp_min(1).double()), 0.0)
    bits = (counts.double() * cost).sum(dim=1)  # per chunk
    used = counts.sum(dim=1).clamp(max=lanes).double()  # lanes with a symbol
    in_states = torch.minimum(used * _STATE_PAYLOAD_BITS, bits)
    words = int(torch.ceil((bits - in_states) / ans.WORD_BITS).sum())
    idx = torch.arange(256).expand_as(counts)
    lo = torch.where(present, idx, 256).amin(dim=1)
    hi = torch.where(present, idx, -1).amax(dim=1)
    return 2 * words, int((hi - lo + 1).clamp_min(0).sum())


def _entropy_bytes(counts: torch.Tensor) -> int:
    """Bytes of each chunk's symbols at their Shannon entropy, summed."""
    if counts.numel() == 0:
        return 0
    total = counts.sum(dim=1, keepdim=True).clamp_min(1).double()
    p = counts.double() / total
    bits = -(counts.double() * torch.where(p > 0, torch.log2(p), 0.0)).sum()
    return math.ceil(float(bits) / 8)


def unencoded(t: torch.Tensor, config: CodecConfig, name: str | None = None) -> CompressedTensor:
    """The stand-in of ``compress(t, config=config)`` (lossless, codec resolved): its header with
    estimated exponent bytes, planes on the meta device sized by that header."""
    if config.mode != "lossless" or config.codec is None:
        raise ValueError("a stand-in is made for lossless settings with the codec resolved")
    # the encoder's symbols, split where the tensor is; only they (a byte a weight) reach the
    # host, where numpy counts them
    symbols = planes.split(t.detach())[0].cpu()
    chunk = config.resolved_chunk_size
    counts = chunk_counts(symbols, chunk)
    del symbols
    if config.codec == "ans":
        exp_nbytes, table_len = _ans_sizes(counts, config.prob_bits, config.lanes)
    else:
        exp_nbytes, table_len = _entropy_bytes(counts), 0
    header = Header(
        dtype=t.dtype,
        shape=tuple(t.shape),
        mode="lossless",
        codec=config.codec,
        chunk_size=chunk,
        lanes=config.lanes if config.codec == "ans" else Header.lanes,
        prob_bits=config.prob_bits if config.codec == "ans" else Header.prob_bits,
        table_len=table_len,
        exp_nbytes=exp_nbytes,
    )
    meta = {
        k: torch.empty(n, dtype=torch.uint8, device="meta") for k, n in header.plane_sizes().items()
    }
    return CompressedTensor(header, meta, name)
