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
element. ``decode_triton`` runs one program per chunk and writes finished floats (fused merge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import HAS_TRITON
from . import planes as _planes

STATE_BITS = 32
WORD_BITS = 16
L = 1 << 16
DEFAULT_PROB_BITS = 12
DEFAULT_LANES = 32
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
    """
    M = 1 << prob_bits
    counts = counts.to(torch.int64)
    total = counts.sum(dim=1, keepdim=True).clamp_min(1)
    scaled = counts.double() * M / total.double()
    freq = scaled.floor().to(torch.int64)
    present = counts > 0
    freq = torch.where(present & (freq == 0), torch.ones_like(freq), freq)
    deficit = M - freq.sum(dim=1)
    # positive deficit (< number of present symbols): +1 to the largest fractional parts
    frac = torch.where(present, scaled - scaled.floor(), torch.full_like(scaled, -1.0))
    rank = torch.empty_like(freq)
    rank.scatter_(1, frac.argsort(dim=1, descending=True), torch.arange(256).expand_as(freq))
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


def _compact_tables(
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
    M = 1 << prob_bits
    # Tables of 257 entries per chunk: f | cum << 16. Entry 256 is the identity (f = M, cum = 0:
    # no emission, no change), which positions past a chunk's end read.
    f = torch.cat([freq, torch.full((C, 1), M, dtype=torch.int64)], dim=1)
    cum = torch.cat([freq.cumsum(dim=1) - freq, torch.zeros(C, 1, dtype=torch.int64)], dim=1)
    tab = (f | (cum << 16)).reshape(-1).numpy().astype(np.uint32)
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
        lo, tlen, tfreq = _compact_tables(freq, prob_bits)
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


# ---------------------------------------------------------------------------------------------
# Triton decoder: LUT build + one program per chunk, merge fused
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
            _planes.merge_values(
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


if HAS_TRITON:

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
    """The same stream as :func:`encode`, encoded where the symbols are (a CUDA device, or the
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
    M = 1 << prob_bits
    f = torch.cat([freq, torch.full((C, 1), M, dtype=torch.int64)], dim=1)
    cum = torch.cat([freq.cumsum(dim=1) - freq, torch.zeros(C, 1, dtype=torch.int64)], dim=1)
    tab = (f | (cum << 16)).to(dev)
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
    lo, tlen, tfreq = _compact_tables(freq, prob_bits)
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
        _planes.out_bits_view(out),
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
        OUT=_planes.FMT_OF[out.dtype],
        num_warps=1,
    )
    return status
