"""Lane-interleaved rANS for exponent symbols, built for GPU decoding.

A symbol plane is cut into chunks of ``chunk_size`` symbols. A chunk is coded by ``lanes`` (W)
interleaved rANS coders: symbol ``s * W + l`` of the chunk belongs to lane ``l`` at step ``s``.
States are 32-bit, renormalization moves 16-bit words, probabilities have ``prob_bits`` (12) bits:

    L = 2**16, M = 2**prob_bits, every lane starts encoding (and ends decoding) at x = L
    encode, s from last to first:  if x >= 2**(32 - prob_bits) * f: emit x & 0xFFFF, x >>= 16
                                   x = (x // f) * M + x % f + cum          (f, cum of the symbol)
    decode, s from first to last:  slot = x & (M - 1); symbol = LUT[slot]
                                   x = f * (x >> prob_bits) + slot - cum
                                   if x < L: x = x << 16 | word

The word a decoder reads after (s, l) is the one the encoder emitted at (s, l), so a chunk's
stream is the emitted words in row-major (s, l) order, and a lane that must read takes the word at
the chunk's pointer plus the exclusive prefix sum of the lanes' "needs a word" flags.

Per chunk the stream keeps: W final states (uint32), a word offset, and a frequency table over the
symbol range [lo, lo + len) (uint16 each, summing to M). Every lane must end at x = L and consume
exactly its chunk's words: a decoder that finds otherwise reports the chunk as damaged.

The CPU functions here are the reference and the CPU path: all lanes of all chunks (of several
tensors at once) form one vector, so the Python loop runs chunk_size / W times per pass, never per
element. Their Triton twins are in ans_encode_triton.py (the device encoder, one launch per
block) and ans_triton.py (the fused GPU decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STATE_BITS = 32
WORD_BITS = 16
L = 1 << 16
DEFAULT_PROB_BITS = 12
# 32 lanes keep issue 2's bits (MiniLM 10.6077 lossless, 6.6489 lossy k=3). 64 (two states per
# thread on the GPU; CodecConfig(lanes=64)) decode faster in the model (BENCHMARKS, issue 12) for
# ~0.012 bits per weight more: each lane's final state costs ~24 bits
DEFAULT_LANES = 32
# The GPU codec keeps a chunk's lanes in one warp (lanes / 32 states per thread), which is as far
# as it is tested and compiled (`benchmarks/compile_kernels.py --lanes 128`: no spills on
# sm_80-90 with triton 3.9 and 3.6; decoder <= 147 registers). More states per thread do not pay:
# in the model 128 lanes already decode a lone tensor slower than 64 (BENCHMARKS, issue 12), and
# each lane's final state costs bits. (Before the per-group ballots, 256 lanes spilled.)
MAX_LANES = 128
DEFAULT_CHUNK = 1 << 16
# At most this many symbols go through one vectorized pass (temporaries: ~4-5 bytes per
# symbol). Measured on SmolLM2's planes, one thread: 16M and 32M encode at the same speed, 8M
# 6% and 4M 25% slower (the per-step call cost is paid on fewer lanes).
_MAX_PASS_SYMBOLS = 1 << 24


@dataclass
class AnsStream:
    """One tensor's rANS-coded symbols. All fields are 1-D CPU or CUDA tensors.

    Chunk c's frequency table covers symbols lo[c] .. lo[c] + len[c] - 1; its entries follow those
    of chunk c - 1 in ``table_freq``, each ``prob_bits`` bits wide (little-endian bit stream).
    A table of one entry means f = M (an entry of 0 otherwise marks an absent symbol).
    """

    words: torch.Tensor  # int16 [n_words] (uint16 bit patterns)
    states: torch.Tensor  # int32 [n_chunks * lanes] (uint32 bit patterns)
    word_offsets: torch.Tensor  # int32 [n_chunks + 1] (uint32), in words
    table_lo: torch.Tensor  # uint8 [n_chunks]: first symbol of each chunk's table
    table_len: torch.Tensor  # uint8 [n_chunks]: entries - 1
    table_freq: torch.Tensor  # uint8 [ceil(T * prob_bits / 8)]: packed frequencies

    def table_offsets(self) -> torch.Tensor:
        """int32 [n_chunks + 1]: where each chunk's entries start (derived, on the same device)."""
        lengths = self.table_len.to(torch.int32) + 1
        return torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)])


def n_chunks(n: int, chunk_size: int) -> int:
    return (n + chunk_size - 1) // chunk_size


def table_nbytes(entries: int, prob_bits: int) -> int:
    return (entries * prob_bits + 7) // 8


# ---------------------------------------------------------------------------------------------
# frequency tables
# ---------------------------------------------------------------------------------------------


def normalize_counts(counts: torch.Tensor, prob_bits: int) -> torch.Tensor:
    """Counts [C, 256] → frequencies [C, 256] summing to 2**prob_bits, present symbols >= 1.

    Floors the scaled counts, lifts present symbols to 1, hands the remainder to the symbols with
    the largest fractional parts and, when lifting overshot, takes it back from the largest.
    Exact integer arithmetic, every tie broken one way (the device encoder in
    ans_encode_triton.py computes the same tables): the fractional parts of c * M / total are
    compared as remainders c * M mod total (one denominator), equal ones go to the lower symbol
    first; the largest frequency taken from is the lowest symbol's among equals.
    """
    M = 1 << prob_bits
    counts = counts.to(torch.int64)
    total = counts.sum(dim=1, keepdim=True).clamp_min(1)
    freq = counts * M // total
    rem = counts * M - freq * total  # the fractional part times total
    present = counts > 0
    freq = torch.where(present & (freq == 0), torch.ones_like(freq), freq)
    deficit = M - freq.sum(dim=1)
    # positive deficit (< number of present symbols): +1 to the largest fractional parts, by
    # the key rem * 256 + 255 - symbol (distinct for present symbols; absent ones rank last)
    sym = torch.arange(256)
    key = torch.where(present, rem * 256 + 255 - sym, torch.full_like(rem, -1))
    rank = torch.empty_like(freq)
    order = key.argsort(dim=1, descending=True, stable=True)
    rank.scatter_(1, order, sym.expand_as(freq))
    freq += (rank < deficit.clamp_min(0)[:, None]).to(torch.int64)
    # negative deficit: take from the largest frequencies, never below 1
    deficit = M - freq.sum(dim=1)
    while bool((deficit < 0).any()):
        top = freq.argmax(dim=1)
        fmax = freq.gather(1, top[:, None]).squeeze(1)
        take = torch.minimum(-deficit, (fmax - 1) // 2 + 1).clamp_min(0)
        take = torch.where(deficit < 0, take, torch.zeros_like(take))
        freq.scatter_add_(1, top[:, None], -take[:, None])
        deficit = deficit + take
    return freq


def _chunk_counts(sym: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Symbol histogram of each chunk: [C, 256] int64."""
    if sym.numel() == 0:
        return torch.zeros(0, 256, dtype=torch.int64)
    return torch.stack([torch.bincount(c, minlength=256) for c in sym.split(chunk_size)])


def _pack_entries(values: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative ints < 2**width → a little-endian bit stream of ``width``-bit fields."""
    T = values.numel()
    nbytes = table_nbytes(T, width)
    bits = ((values.to(torch.int64)[:, None] >> torch.arange(width)) & 1).reshape(-1)
    bits = torch.cat([bits, bits.new_zeros(nbytes * 8 - bits.numel())]).view(-1, 8)
    return (bits << torch.arange(8)).sum(dim=1).to(torch.uint8)


def _unpack_entries(packed: torch.Tensor, T: int, width: int) -> torch.Tensor:
    pos = torch.arange(T, dtype=torch.int64) * width
    byte = pos >> 3
    pad = torch.cat([packed.cpu().to(torch.int64), torch.zeros(2, dtype=torch.int64)])
    word = pad[byte] | (pad[byte + 1] << 8) | (pad[byte + 2] << 16)
    return (word >> (pos & 7)) & ((1 << width) - 1)


def compact_tables(
    freq: torch.Tensor, prob_bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[C, 256] frequencies → (lo uint8 [C], len - 1 uint8 [C], packed entries) over [lo, hi]."""
    C = freq.shape[0]
    present = freq > 0
    idx = torch.arange(256).expand(C, 256)
    lo = torch.where(present, idx, 256).amin(dim=1)
    hi = torch.where(present, idx, -1).amax(dim=1)
    keep = (idx >= lo[:, None]) & (idx <= hi[:, None])
    entries = freq[keep] & ((1 << prob_bits) - 1)  # row-major: chunk by chunk; M (alone) → 0
    return lo.to(torch.uint8), (hi - lo).to(torch.uint8), _pack_entries(entries, prob_bits)


def expand_tables(stream: AnsStream, prob_bits: int) -> torch.Tensor:
    """Per-chunk frequency tables back as [C, 256] int64 (validated by the caller)."""
    C = stream.table_lo.numel()
    length = stream.table_len.cpu().to(torch.int64) + 1
    T = int(length.sum())
    starts = torch.cumsum(length, 0) - length
    chunk_of_entry = torch.repeat_interleave(torch.arange(C), length)
    pos = torch.arange(T) - starts.repeat_interleave(length)
    sym = stream.table_lo.cpu().to(torch.int64).repeat_interleave(length) + pos
    values = _unpack_entries(stream.table_freq, T, prob_bits)
    values = torch.where(length.repeat_interleave(length) == 1, 1 << prob_bits, values)
    freq = torch.zeros(C, 256, dtype=torch.int64)
    freq[chunk_of_entry, sym.clamp(max=255)] = values
    return freq


def encoder_tables(freq: torch.Tensor, prob_bits: int) -> torch.Tensor:
    """[C, 256] frequencies → the encoders' step tables [C, 257] int64: f | cum << 16.

    Entry 256 is the identity (f = M, cum = 0: no emission, no change), which positions past a
    chunk's end read.
    """
    C, M = freq.shape[0], 1 << prob_bits
    f = torch.cat([freq, torch.full((C, 1), M, dtype=torch.int64)], dim=1)
    cum = torch.cat([freq.cumsum(dim=1) - freq, torch.zeros(C, 1, dtype=torch.int64)], dim=1)
    return f | (cum << 16)


def validate(stream: AnsStream, n: int, chunk_size: int, lanes: int, prob_bits: int) -> str | None:
    """Check a stream's structure before any decoder touches memory; returns what is wrong."""
    C = n_chunks(n, chunk_size)
    checks = [
        (stream.states.numel() == C * lanes, f"states: expected {C * lanes} entries"),
        (stream.word_offsets.numel() == C + 1, f"word offsets: expected {C + 1} entries"),
        (stream.table_lo.numel() == C, f"table starts: expected {C} entries"),
        (stream.table_len.numel() == C, f"table lengths: expected {C} entries"),
    ]
    for ok, what in checks:
        if not ok:
            return what
    if C == 0:
        return None
    woff = stream.word_offsets.cpu().to(torch.int64) & 0xFFFFFFFF
    if woff[0] != 0 or bool((woff[1:] < woff[:-1]).any()) or woff[-1] != stream.words.numel():
        return "word offsets are not increasing from 0 to the number of words"
    length = stream.table_len.cpu().to(torch.int64) + 1
    if table_nbytes(int(length.sum()), prob_bits) != stream.table_freq.numel():
        return "the frequency tables do not fill their bytes"
    if bool((stream.table_lo.cpu().to(torch.int64) + length > 256).any()):
        return "a frequency table runs past symbol 255"
    sums = expand_tables(stream, prob_bits).sum(dim=1)
    if bool((sums != (1 << prob_bits)).any()):
        return f"a frequency table does not sum to {1 << prob_bits}"
    states = stream.states.cpu().to(torch.int64) & 0xFFFFFFFF
    if bool((states < L).any()):
        return "a final state is below the rANS lower bound"
    return None


# ---------------------------------------------------------------------------------------------
# encoder (CPU)
#
# The two step loops below run on numpy views of the torch tensors: they are ~15 calls on
# vectors of C * W lanes per step, and numpy's per-call cost is a third of torch's while its
# uint32 arithmetic (torch's uint32 has no shifts, compares or gathers) halves the bytes moved.
# Measured on MiniLM, 2 cores: 1.5x faster than the same loop in torch.
# ---------------------------------------------------------------------------------------------


def _encode_pass(
    sym: np.ndarray, lengths: torch.Tensor, freq: torch.Tensor, lanes: int, prob_bits: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encode C chunks at once. sym [S, C, W] uint8 (step, chunk, lane); lengths [C];
    freq [C, 256].

    Returns (the words of each chunk, int16 in stream order; final states int64 [C, W]).
    """
    S, C, W = sym.shape
    tab = encoder_tables(freq, prob_bits).reshape(-1).numpy().astype(np.uint32)
    row = (np.arange(C, dtype=np.intp) * 257)[:, None]
    # Ragged chunks (shorter than S * W) are the only ones with positions past their end:
    # from step ragged_from on, their rows are fixed up to read the identity entry.
    lengths_np = lengths.numpy()
    ragged = np.nonzero(lengths_np < S * W)[0]
    last = (lengths_np[ragged, None] - np.arange(W)[None, :] + W - 1) // W  # steps per lane
    ragged_from = int(last.min()) if ragged.size else S
    x = np.full((C, W), L, dtype=np.uint32)
    hist = np.empty((S, C, W), dtype=np.uint16)  # x before each step (its low 16 bits)
    emits = np.empty((S, C, W), dtype=np.bool_)
    shift = np.empty((C, W), dtype=np.uint8)
    fs = np.empty((C, W), dtype=np.uint32)
    idx = np.empty((C, W), dtype=np.intp)
    top = STATE_BITS - prob_bits  # x >= f << top  <=>  x >> top >= f
    for s in range(S - 1, -1, -1):
        np.add(row, sym[s], out=idx)
        if s >= ragged_from:
            idx[ragged] = np.where(last > s, idx[ragged], row[ragged] + 256)
        e = tab.take(idx)
        np.bitwise_and(e, 0xFFFF, out=fs)
        emit = np.greater_equal(x >> top, fs, out=emits[s])
        hist[s] = x
        np.left_shift(emit.view(np.uint8), 4, out=shift)  # emitting lanes drop 16 bits
        x >>= shift
        q, r = np.divmod(x, fs)
        e >>= 16
        r += e  # r + cum < M
        q <<= prob_bits
        q |= r
        x = q
    # the stream of each chunk is its emitted words in row-major (s, l) order; chunk by chunk,
    # so that no transposed copy of the history is made
    words = [torch.from_numpy(hist[:, r, :][emits[:, r, :]].view(np.int16)) for r in range(C)]
    return words, torch.from_numpy(x.astype(np.int64))


def encode_many(
    symbol_planes: list[torch.Tensor],
    chunk_size: int = DEFAULT_CHUNK,
    lanes: int = DEFAULT_LANES,
    prob_bits: int = DEFAULT_PROB_BITS,
) -> list[AnsStream]:
    """Encode several symbol planes (uint8, on the CPU) in shared vectorized passes."""
    if chunk_size % lanes:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of lanes ({lanes})")
    planes_ = [sym.reshape(-1).cpu() for sym in symbol_planes]
    freqs = [normalize_counts(_chunk_counts(sym, chunk_size), prob_bits) for sym in planes_]
    jobs = [
        (i, j, min(chunk_size, sym.numel() - j * chunk_size))
        for i, sym in enumerate(planes_)
        for j in range(n_chunks(sym.numel(), chunk_size))
    ]
    words: list[list[torch.Tensor]] = [[] for _ in planes_]
    counts: list[list[torch.Tensor]] = [[] for _ in planes_]
    states: list[list[torch.Tensor]] = [[] for _ in planes_]
    per_pass = max(1, _MAX_PASS_SYMBOLS // chunk_size)
    for start in range(0, len(jobs), per_pass):
        batch = jobs[start : start + per_pass]
        # the pass's symbols as [S, C, W]: step s of lane l of chunk r is symbol s * W + l
        S = chunk_size // lanes
        sym = np.zeros((S, len(batch), lanes), dtype=np.uint8)
        for r, (i, j, m) in enumerate(batch):
            part = planes_[i][j * chunk_size : j * chunk_size + m].numpy()
            full = m // lanes * lanes
            sym[: m // lanes, r, :] = part[:full].reshape(-1, lanes)
            if full < m:
                sym[m // lanes, r, : m - full] = part[full:]
        lengths = torch.tensor([m for _, _, m in batch], dtype=torch.int64)
        freq = torch.stack([freqs[i][j] for i, j, _ in batch])
        chunk_words, x = _encode_pass(sym, lengths, freq, lanes, prob_bits)
        del sym
        for r, (i, _, _) in enumerate(batch):
            words[i].append(chunk_words[r])
            counts[i].append(torch.tensor([chunk_words[r].numel()], dtype=torch.int64))
            states[i].append(x[r])
    out = []
    for i, freq in enumerate(freqs):
        offsets = torch.zeros(len(counts[i]) + 1, dtype=torch.int64)
        if counts[i]:
            offsets[1:] = torch.cat(counts[i]).cumsum(0)
        lo, tlen, tfreq = compact_tables(freq, prob_bits)
        out.append(
            AnsStream(
                words=torch.cat(words[i]) if words[i] else torch.zeros(0, dtype=torch.int16),
                states=(
                    torch.stack(states[i]).reshape(-1)
                    if states[i]
                    else torch.zeros(0, dtype=torch.int64)
                ).to(torch.int32),
                word_offsets=offsets.to(torch.int32),
                table_lo=lo,
                table_len=tlen,
                table_freq=tfreq,
            )
        )
    return out


def encode(
    symbols: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    lanes: int = DEFAULT_LANES,
    prob_bits: int = DEFAULT_PROB_BITS,
) -> AnsStream:
    return encode_many([symbols], chunk_size, lanes, prob_bits)[0]


# ---------------------------------------------------------------------------------------------
# decoder (CPU): the reference
# ---------------------------------------------------------------------------------------------


def build_luts(freq: torch.Tensor, prob_bits: int) -> torch.Tensor:
    """[C, 256] frequencies → [(C + 1) * M] entries symbol | (f - 1) << 8 | (slot - cum) << 20.

    (Stored as int32 bit patterns.) The last M entries are the identity (f = M, slot - cum = slot):
    x stays and no word is read. The Triton LUT kernel writes the same entries.
    """
    C = freq.shape[0]
    M = 1 << prob_bits
    cum = freq.cumsum(dim=1) - freq
    sym = torch.repeat_interleave(torch.arange(256).repeat(C), freq.reshape(-1)).view(C, M)
    slots = torch.arange(M)[None, :]
    lut = sym | ((freq.gather(1, sym) - 1) << 8) | ((slots - cum.gather(1, sym)) << 20)
    identity = ((M - 1) << 8) | (slots << 20)
    return torch.cat([lut, identity]).reshape(-1).to(torch.int32)  # wraps to the bit pattern


# Bytes before the first program's tables in the GPU decoder's workspace: a program looks up
# (f, cum) by symbol at its entries minus lo, so a stale or damaged slot byte below lo reads up
# to 1020 bytes before its entries; with this guard that stays inside the workspace.
TABLE_GUARD_BYTES = 1024


def table_words(chunks: int, prob_bits: int = DEFAULT_PROB_BITS) -> int:
    """int32 words of workspace the GPU decoder (ans_triton) needs for ``chunks`` chunks: a
    guard, then per chunk's program 2**prob_bits slot symbols (bytes) and 256 int32 (f, cum)
    entries."""
    if chunks <= 0:
        return 0
    return (TABLE_GUARD_BYTES + chunks * ((1 << prob_bits) + 1024)) // 4


def decode_tables(stream: AnsStream, prob_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode kernel's tables of every chunk of ``stream``, as it leaves them in the workspace
    (uint8 [table_words * 4], on the CPU), and a mask of the bytes it writes (not the guard):
    the CPU reference for tests and gpu_check. Per chunk: each slot's symbol, then per entry j of
    its table (symbol lo + j) f | cum << 13 as int32 (0 for an absent symbol)."""
    freq = expand_tables(stream, prob_bits).to(torch.int64)  # [C, 256] by symbol
    C, M = freq.shape[0], 1 << prob_bits
    lo = stream.table_lo.cpu().to(torch.int64)
    j = torch.arange(256)
    sym = (lo[:, None] + j[None, :]).clamp(max=255)
    f = torch.where(lo[:, None] + j[None, :] <= 255, freq.gather(1, sym), 0)
    cum = f.cumsum(dim=1) - f
    fc = torch.where(f > 0, f | (cum << 13), 0).to(torch.int32)
    slot_sym = torch.repeat_interleave(sym.reshape(-1), f.reshape(-1)).view(C, M).to(torch.uint8)
    tables = torch.cat([slot_sym, fc.view(torch.uint8)], dim=1).reshape(-1)
    entries = j[None, :] <= stream.table_len.cpu().to(torch.int64)[:, None]  # [C, 256]
    written = torch.cat([torch.ones(C, M, dtype=torch.bool), entries.repeat_interleave(4, 1)], 1)
    guard = torch.zeros(TABLE_GUARD_BYTES, dtype=torch.uint8)
    return torch.cat([guard, tables]), torch.cat([guard.bool(), written.reshape(-1)])


def decode_many(
    streams: list[AnsStream],
    sizes: list[int],
    chunk_size: int = DEFAULT_CHUNK,
    lanes: int = DEFAULT_LANES,
    prob_bits: int = DEFAULT_PROB_BITS,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decode several (validated) streams in shared passes → (symbols uint8 [n], ok bool [C])."""
    jobs = [
        (i, j, min(chunk_size, n - j * chunk_size))
        for i, n in enumerate(sizes)
        for j in range(n_chunks(n, chunk_size))
    ]
    symbols = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    oks = [torch.ones(n_chunks(n, chunk_size), dtype=torch.bool) for n in sizes]
    freqs = [expand_tables(st, prob_bits) for st in streams]
    per_pass = max(1, _MAX_PASS_SYMBOLS // chunk_size)
    for start in range(0, len(jobs), per_pass):
        batch = jobs[start : start + per_pass]
        sym, ok = _decode_pass(streams, freqs, batch, chunk_size, lanes, prob_bits)
        for r, (i, j, m) in enumerate(batch):
            symbols[i][j * chunk_size : j * chunk_size + m] = sym[r, :m]
            oks[i][j] = ok[r]
    return symbols, oks


def _decode_pass(
    streams: list[AnsStream],
    freqs: list[torch.Tensor],
    batch: list[tuple[int, int, int]],
    chunk_size: int,
    lanes: int,
    prob_bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the chunks ``batch`` = [(stream, chunk, length)] as one [C, W] vector of lanes."""
    C, W, S, M = len(batch), lanes, chunk_size // lanes, 1 << prob_bits
    # Ragged chunks (shorter than chunk_size) go last, so the steps where some lane has run out
    # of symbols only touch that tail.
    order = sorted(range(C), key=lambda r: batch[r][2] < chunk_size)
    batch = [batch[r] for r in order]
    lut = build_luts(torch.stack([freqs[i][j] for i, j, _ in batch]), prob_bits).numpy()
    lut = lut.view(np.uint32)
    x = np.stack([streams[i].states.view(-1, W)[j].numpy() for i, j, _ in batch]).view(np.uint32)
    # One word buffer for the pass, with one word in front so that a lane's inclusive prefix sum
    # addresses its word directly, and S * W behind so that a damaged stream cannot read past it.
    pieces, starts, ends, base = [np.zeros(1, dtype=np.uint16)], [], [], 0
    for i, j, _ in batch:
        off = streams[i].word_offsets
        a, b = int(off[j]) & 0xFFFFFFFF, int(off[j + 1]) & 0xFFFFFFFF
        pieces.append(streams[i].words[a:b].numpy().view(np.uint16))
        starts.append(base)
        base += b - a
        ends.append(base)
    pieces.append(np.zeros(S * W, dtype=np.uint16))
    words = np.concatenate(pieces).astype(np.uint32)
    ptr = np.array(starts, dtype=np.int64)[:, None]
    lut_base = (np.arange(C, dtype=np.uint32) * M)[:, None]
    # Lane l of a ragged chunk holds a symbol at step s while s < last[l]; after that it reads
    # the identity table (entries C * M + slot).
    lengths = np.array([m for _, _, m in batch], dtype=np.int64)
    c0 = int(np.searchsorted(lengths < chunk_size, True))  # first ragged row
    last = (lengths[c0:, None] - np.arange(W)[None, :] + W - 1) // W
    ragged_from = int(last.min()) if c0 < C else S
    out = np.empty((S, C, W), dtype=np.uint8)
    slot = np.empty((C, W), dtype=np.uint32)
    idx = np.empty((C, W), dtype=np.uint32)
    for s in range(S):
        np.bitwise_and(x, M - 1, out=slot)
        np.bitwise_or(slot, lut_base, out=idx)
        if s >= ragged_from:
            idx[c0:] = np.where(last > s, idx[c0:], slot[c0:] | (C * M))
        e = lut.take(idx)
        out[s] = e  # the low byte is the symbol
        x = (x >> prob_bits) * (((e >> 8) & 0xFFF) + 1) + (e >> 20)
        need = x < L
        inc = need.cumsum(axis=1)
        w = words.take(ptr + inc)
        x = np.where(need, (x << WORD_BITS) | w, x)
        ptr += inc[:, -1:]
    ok = (x == L).all(axis=1) & (ptr[:, 0] == np.array(ends, dtype=np.int64))
    sym = torch.from_numpy(out).permute(1, 0, 2).reshape(C, S * W)
    unsort = torch.empty(C, dtype=torch.int64)
    unsort[torch.tensor(order, dtype=torch.int64)] = torch.arange(C)
    return sym[unsort], torch.from_numpy(ok)[unsort]


def decode(
    stream: AnsStream,
    n: int,
    chunk_size: int = DEFAULT_CHUNK,
    lanes: int = DEFAULT_LANES,
    prob_bits: int = DEFAULT_PROB_BITS,
) -> tuple[torch.Tensor, torch.Tensor]:
    symbols, oks = decode_many([stream], [n], chunk_size, lanes, prob_bits)
    return symbols[0], oks[0]
