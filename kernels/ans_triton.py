"""Triton twins of the rANS coder in ans.py: a device encoder and the fused decoder.

The decoder is the scheduler's GPU path: the LUT kernel builds each chunk's slot table, then the
decode kernel, one program per chunk, walks its W lanes as one vector and writes finished floats,
merging each step's symbols with their raw bits (planes_triton.merge_values). The encoder writes the
stream ans.encode writes, bit for bit, where the symbols are (a CUDA device, or the CPU under
Triton's interpreter). Streams, tables and their layout are ans.py's; both sides are tested
against its CPU reference.
"""

from __future__ import annotations

import torch

from . import HAS_TRITON, planes, planes_triton
from .ans import (
    DEFAULT_CHUNK,
    DEFAULT_LANES,
    DEFAULT_PROB_BITS,
    AnsStream,
    compact_tables,
    encoder_tables,
    n_chunks,
    normalize_counts,
)

# ---------------------------------------------------------------------------------------------
# kernels: the decoder (LUT build + one program per chunk, merge fused) and the encoder
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _table_entry(freq_ptr, k, nbytes, PROB_BITS: tl.constexpr):
        """Entry k of the packed PROB_BITS-bit table stream (spans at most three bytes), as int32
        whatever the type of k (a loop carries what it returns)."""
        pos = k.to(tl.int64) * PROB_BITS
        byte = pos >> 3
        b0 = tl.load(freq_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
        b1 = tl.load(freq_ptr + byte + 1, mask=byte + 1 < nbytes, other=0).to(tl.int32)
        b2 = tl.load(freq_ptr + byte + 2, mask=byte + 2 < nbytes, other=0).to(tl.int32)
        word = b0 | (b1 << 8) | (b2 << 16)
        return (word >> (pos & 7).to(tl.int32)) & ((1 << PROB_BITS) - 1)

    @triton.jit
    def _lut_kernel(
        lo_ptr,
        toff_ptr,
        freq_ptr,
        lut_ptr,
        nbytes,
        first_chunk,
        PROB_BITS: tl.constexpr,
        TILE: tl.constexpr,
    ):
        """Chunk c's slot table: uint32 entries symbol | (f - 1) << 8 | (slot - cum) << 20.

        The M slots are walked in tiles of TILE (TILE / (32 * num_warps) registers per vector and
        thread). Symbols are visited once in all: a tile passes the symbols that end inside it and
        hands the one that crosses its end (j, starting at slot run) to the next tile. Table
        entries that are 0 (absent symbols inside [lo, lo + len)) pass without taking a slot.
        """
        M: tl.constexpr = 1 << PROB_BITS
        c = tl.program_id(0).to(tl.int64) + first_chunk
        t0 = tl.load(toff_ptr + c).to(tl.int64)
        nsym = tl.load(toff_ptr + c + 1).to(tl.int64) - t0
        lo = tl.load(lo_ptr + c).to(tl.int32)
        j = tl.zeros((), dtype=tl.int32)  # the first symbol not yet passed
        run = tl.zeros((), dtype=tl.int32)  # where symbol j starts: the sum of f before it
        for t in range(0, M // TILE):
            slots = t * TILE + tl.arange(0, TILE)
            last = t * TILE + TILE - 1
            idx = tl.zeros((TILE,), dtype=tl.int32) + j
            cum = tl.zeros((TILE,), dtype=tl.int32) + run
            fj = tl.where(nsym == 1, M, _table_entry(freq_ptr, t0 + j, nbytes, PROB_BITS))
            # frequencies sum to M (validated), so some symbol ends past every tile; j < nsym
            # only bounds the walk for a damaged table
            while (run + fj <= last) & (j < nsym):
                run += fj
                past = slots >= run  # slots from here on belong to a later symbol
                idx += past.to(tl.int32)
                cum += tl.where(past, fj, 0)
                j += 1
                fj = _table_entry(freq_ptr, t0 + j, nbytes, PROB_BITS)
            f = _table_entry(freq_ptr, t0 + idx, nbytes, PROB_BITS)
            f = tl.where(nsym == 1, M, f)
            entry = (
                (lo + idx).to(tl.uint32)
                | ((f - 1).to(tl.uint32) << 8)
                | ((slots - cum).to(tl.uint32) << 20)
            )
            tl.store(lut_ptr + c * M + slots, entry.to(tl.int32, bitcast=True))

    @triton.jit
    def _decode_kernel(
        words_ptr,
        states_ptr,
        woff_ptr,
        lut_ptr,
        raw_ptr,
        scale_ptr,
        out_ptr,
        status_ptr,
        n,
        first_chunk,
        CHUNK: tl.constexpr,
        LANES: tl.constexpr,
        PROB_BITS: tl.constexpr,
        FMT: tl.constexpr,
        K: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        NORMALIZE: tl.constexpr,
        OUT: tl.constexpr,
    ):
        M: tl.constexpr = 1 << PROB_BITS
        c = tl.program_id(0).to(tl.int64) + first_chunk
        n = tl.cast(n, tl.int64)  # element indices c * CHUNK + ... pass 2**31 in large tensors
        lanes = tl.arange(0, LANES)
        x = tl.load(states_ptr + c * LANES + lanes).to(tl.uint32, bitcast=True)
        ptr = tl.load(woff_ptr + c).to(tl.uint32, bitcast=True).to(tl.int64)
        end = tl.load(woff_ptr + c + 1).to(tl.uint32, bitcast=True).to(tl.int64)
        base = c * CHUNK
        steps = (tl.minimum(n - base, CHUNK) + LANES - 1) // LANES
        lut = lut_ptr + c * M
        for s in range(0, steps):
            offs = base + s * LANES + lanes
            valid = offs < n
            e = tl.load(lut + (x & (M - 1))).to(tl.uint32, bitcast=True)
            x_new = (((e >> 8) & 0xFFF) + 1) * (x >> PROB_BITS) + (e >> 20)
            x = tl.where(valid, x_new, x)
            need = valid & (x < 65536)
            inc = tl.cumsum(need.to(tl.int32), 0)
            pos = ptr + (inc - need.to(tl.int32)).to(tl.int64)
            w = tl.load(words_ptr + pos, mask=need & (pos < end), other=0)
            w = w.to(tl.uint16, bitcast=True).to(tl.uint32)
            x = tl.where(need, (x << 16) | w, x)
            ptr += tl.sum(need.to(tl.int64), 0)
            planes_triton.merge_values(
                e & 0xFF,
                offs,
                valid,
                n,
                raw_ptr,
                scale_ptr,
                out_ptr,
                FMT,
                K,
                BLOCK_SIZE,
                NORMALIZE,
                OUT,
            )
        ok = (tl.sum((x != 65536).to(tl.int32), 0) == 0) & (ptr == end)
        tl.store(status_ptr + c, ok.to(tl.int8))

    @triton.jit
    def _encode_kernel(
        sym_ptr,
        len_ptr,
        tab_ptr,
        hist_ptr,
        emit_ptr,
        state_ptr,
        CHUNK: tl.constexpr,
        LANES: tl.constexpr,
        PROB_BITS: tl.constexpr,
    ):
        """Chunk c, its lanes side by side, from the last step to the first (rANS encodes in
        reverse): writes the state's low 16 bits before each step (the word, if the step emits),
        whether it emits, and the final states. Positions past the chunk's end read the identity
        entry 256 (f = M: never emits, state unchanged). int64 arithmetic (states < 2**32)."""
        S: tl.constexpr = CHUNK // LANES
        c = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, LANES)
        n = tl.load(len_ptr + c).to(tl.int64)
        base = c * CHUNK
        tab = tab_ptr + c * 257
        x = tl.full((LANES,), 65536, tl.int64)
        for i in range(0, S):
            pos = (S - 1 - i) * LANES + lanes
            valid = pos < n
            sym = tl.load(sym_ptr + base + pos, mask=valid, other=0).to(tl.int64)
            e = tl.load(tab + tl.where(valid, sym, 256))
            f = e & 0xFFFF
            emit = (x >> (32 - PROB_BITS)) >= f
            low = x & 0xFFFF
            tl.store(hist_ptr + base + pos, (low - ((low >> 15) << 16)).to(tl.int16))
            tl.store(emit_ptr + base + pos, emit.to(tl.int8))
            x = tl.where(emit, x >> 16, x)
            q = x // f
            x = (q << PROB_BITS) + (x - q * f) + (e >> 16)
        tl.store(state_ptr + c * LANES + lanes, (x - ((x >> 31) << 32)).to(tl.int32))


# Slots per tile of the LUT kernel: 4 per thread at 4 warps, so it needs few registers (one
# vector of all 4096 slots at PROB_BITS=12 used ~255 registers and spilled)
_LUT_TILE = 512
_COUNT_ROWS = 64  # chunks per histogram launch of the device encoder (bounds its index buffer)


def _chunk_counts_device(sym: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Symbol histogram of each chunk on the symbols' device, returned on the CPU: [C, 256]."""
    n = sym.numel()
    C = n_chunks(n, chunk_size)
    counts = torch.zeros(C * 256, dtype=torch.int64, device=sym.device)
    for c0 in range(0, C, _COUNT_ROWS):
        c1 = min(C, c0 + _COUNT_ROWS)
        part = sym[c0 * chunk_size : min(n, c1 * chunk_size)].to(torch.int32)
        row = torch.arange(part.numel(), device=sym.device, dtype=torch.int32) // chunk_size
        idx = row * 256 + part
        counts[c0 * 256 : c1 * 256] = torch.bincount(idx, minlength=(c1 - c0) * 256)
    return counts.view(C, 256).cpu()


def encode_triton(
    symbols: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    lanes: int = DEFAULT_LANES,
    prob_bits: int = DEFAULT_PROB_BITS,
) -> AnsStream:
    """The same stream as :func:`ans.encode`, encoded where the symbols are (a CUDA device, or the
    CPU under Triton's interpreter): one program per chunk, then one compaction of the emitted
    words. The frequency tables are normalized on the host (C x 256 counts)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    if chunk_size % lanes:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of lanes ({lanes})")
    sym = symbols.reshape(-1).contiguous()
    dev, n = sym.device, sym.numel()
    C = n_chunks(n, chunk_size)
    freq = normalize_counts(_chunk_counts_device(sym, chunk_size), prob_bits)
    tab = encoder_tables(freq, prob_bits).to(dev)
    lengths = torch.full((C,), chunk_size, dtype=torch.int64)
    if C:
        lengths[-1] = n - (C - 1) * chunk_size
    hist = torch.empty(C * chunk_size, dtype=torch.int16, device=dev)
    emit = torch.empty(C * chunk_size, dtype=torch.int8, device=dev)
    states = torch.empty(C * lanes, dtype=torch.int32, device=dev)
    if C:
        _encode_kernel[(C,)](
            sym,
            lengths.to(dev),
            tab,
            hist,
            emit,
            states,
            CHUNK=chunk_size,
            LANES=lanes,
            PROB_BITS=prob_bits,
            num_warps=1,
        )
    # chunk by chunk, each chunk's words in (step, lane) order: the order the decoder reads
    emitted = emit.view(torch.bool)
    words = hist[emitted]
    offsets = torch.zeros(C + 1, dtype=torch.int64, device=dev)
    if C:
        offsets[1:] = emitted.view(C, chunk_size).sum(dim=1).cumsum(0)
    lo, tlen, tfreq = compact_tables(freq, prob_bits)
    return AnsStream(
        words=words,
        states=states,
        word_offsets=offsets.to(torch.int32),
        table_lo=lo.to(dev),
        table_len=tlen.to(dev),
        table_freq=tfreq.to(dev),
    )


def decode_triton(
    stream: AnsStream,
    raw: torch.Tensor,
    scales: torch.Tensor | None,
    out: torch.Tensor,
    *,
    fmt: int,
    mantissa_bits: int = 0,
    block_size: int = 1,
    chunk_size: int = DEFAULT_CHUNK,
    lanes: int = DEFAULT_LANES,
    prob_bits: int = DEFAULT_PROB_BITS,
    workspace: torch.Tensor | None = None,
    first_chunk: int = 0,
) -> torch.Tensor:
    """Decode a (validated) stream straight into ``out`` (1-D). Returns int8 status per chunk.

    No host synchronization: the status stays on the device for the caller to check when it
    chooses. ``workspace`` (int32, >= n_chunks * 2**prob_bits) holds the slot tables.
    ``first_chunk`` > 0 decodes only chunks [first_chunk, n_chunks) (their statuses; the others
    stay 0): tests use it to reach the indices of very large tensors.
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    n = out.numel()
    C = n_chunks(n, chunk_size)
    status = torch.zeros(C, dtype=torch.int8, device=out.device)
    if not 0 <= first_chunk <= C:
        raise ValueError(f"first_chunk must be in 0..{C}, got {first_chunk}")
    if first_chunk == C:
        return status
    M = 1 << prob_bits
    if workspace is None:
        workspace = torch.empty(C * M, dtype=torch.int32, device=out.device)
    grid = (C - first_chunk,)
    _lut_kernel[grid](
        stream.table_lo,
        stream.table_offsets(),
        stream.table_freq,
        workspace,
        stream.table_freq.numel(),
        first_chunk,
        PROB_BITS=prob_bits,
        TILE=min(M, _LUT_TILE),
        num_warps=4,
    )
    _decode_kernel[grid](
        stream.words,
        stream.states,
        stream.word_offsets,
        workspace,
        raw,
        scales if scales is not None else raw,
        planes_triton.out_bits_view(out),
        status,
        n,
        first_chunk,
        CHUNK=chunk_size,
        LANES=lanes,
        PROB_BITS=prob_bits,
        FMT=fmt,
        K=mantissa_bits,
        BLOCK_SIZE=block_size,
        NORMALIZE=scales is not None,
        OUT=planes.FMT_OF[out.dtype],
        num_warps=1,
    )
    return status
