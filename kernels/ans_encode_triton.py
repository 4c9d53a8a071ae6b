"""The device rANS encoder: ans.encode's streams, bit for bit, for a block of tensors per launch.

Where it sits: compress() (codec.py; training's re-encode goes through it) splits CUDA weights on
the device and hands their exponent planes here, all tensors of one rANS setting together; the
streams come back on the same device, in ans.py's layout, for the format to pack. Under Triton's
interpreter the same code runs on CPU tensors (the tests).

One launch covers every chunk of every tensor. The block's symbol planes lie back to back in one
buffer; a chunk table (int64: where each chunk starts in it, and the end) tells program p its
chunk. Program p, one warp:

1. counts its chunk's symbols (histograms of HIST-symbol tiles), normalizes the counts exactly as
   ans.normalize_counts does (integer arithmetic: floors, remainders, a threshold search for the
   largest remainders), and writes the compact table (lo, len - 1, entries) and its encoder table:
   per symbol one int64 f | cum << 16 | rcp << 32, in its own region of a workspace;
2. encodes its W lanes as one vector from the last step to the first, in uint32: the quotient
   x // f is umulhi(x, rcp) with rcp = floor(2**32 / f) and one correction (see _step). Four
   steps per trip; the symbols of a step are loaded five steps ahead and its table entries one
   step ahead (from L1), so the dependent chain per step is the state's ALU arithmetic. Emitted
   words go, in stream order, backward from the end of the chunk's region of a word scratch
   (indexed like the symbols): a lane's position is its rank among the step's emitting lanes (a
   ballot and population counts).

Then, per block: one host sync (the words and table entries of each chunk, to size the
outputs), and torch ops on the device gather the words into one buffer, derive the word
offsets, and pack the tables' entries into each tensor's bit stream. Each tensor's stream is a
set of views of those block buffers.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from . import HAS_TRITON
from .ans import DEFAULT_CHUNK, DEFAULT_LANES, DEFAULT_PROB_BITS, AnsStream, n_chunks

# int64 entries per program's encoder table: 256 symbols and the identity (rows of 64 bytes)
_TAB_ENTRIES = 264

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .lanes_triton import lane_ranks  # the decoder's too: the same ballot ranks its lanes

    _TAB = tl.constexpr(_TAB_ENTRIES)

    @triton.jit
    def _normalize(counts, total, PROB_BITS: tl.constexpr):
        """Counts [256] int32 of ``total`` (<= 2**24) symbols → frequencies [256] int32 summing
        to M, exactly as ans.normalize_counts (its keys rem * 256 + 255 - symbol: uint32, as
        rem < total). No 64-bit division: floor(c * M / total) comes from a float
        estimate (relative error < 2**-21, so within 2**-9 of c * M / total <= M: off by at most
        one) corrected with the remainder c * M - q * total, which lies in (-total, 2 * total):
        uint32 arithmetic that wraps gives it exactly."""
        M: tl.constexpr = 1 << PROB_BITS
        sym = tl.arange(0, 256)
        present = counts > 0
        q = (counts.to(tl.float32) * (M / total.to(tl.float32))).to(tl.int32)
        c32 = counts.to(tl.uint32)
        rem = (c32 * M - q.to(tl.uint32) * total.to(tl.uint32)).to(tl.int32, bitcast=True)
        q = tl.where(rem < 0, q - 1, q)
        rem = tl.where(rem < 0, rem + total, rem)
        q = tl.where(rem >= total, q + 1, q)
        rem = tl.where(rem >= total, rem - total, rem)
        key = rem.to(tl.uint32) * 256 + (255 - sym).to(tl.uint32)
        freq = tl.where(present & (q == 0), 1, q)
        deficit = M - tl.sum(freq, 0)
        # +1 to the `deficit` largest keys (distinct where present): theta, built bit by bit, is
        # the largest value that at least `deficit` present keys reach: the deficit-th largest
        theta = tl.zeros((), dtype=tl.uint32)
        for b in range(0, 32):
            cand = theta | (tl.full((), 1, tl.uint32) << (31 - b))
            if tl.sum(((key >= cand) & present).to(tl.int32), 0) >= deficit:
                theta = cand
        freq += ((key >= theta) & present & (deficit > 0)).to(tl.int32)
        # lifting overshot: take from the largest (the lowest symbol among equals)
        deficit = M - tl.sum(freq, 0)
        while deficit < 0:
            fmax = tl.max(freq, 0)
            top = tl.min(tl.where(freq == fmax, sym, 256), 0)
            take = tl.minimum(-deficit, (fmax - 1) // 2 + 1)
            freq = tl.where(sym == top, freq - take, freq)
            deficit += take
        return freq

    @triton.jit
    def _symbols(sym, pos):
        """The symbols at ``pos`` (int32 [LANES]; 0 below the chunk, where no step reads them).
        Their first use is the next table load: the byte load's latency is not waited for
        here (no select on the loaded value)."""
        return tl.load(sym + pos, mask=pos >= 0, other=0).to(tl.int32)

    @triton.jit
    def _step(x, written, e, y_next, pos_ahead, sym, tab, end, PROB_BITS: tl.constexpr):
        """One step of a chunk's lanes: x (uint32 [LANES]) with table entries ``e`` (int64:
        f | cum << 16 | rcp << 32); its words go before the ``written`` of the later steps, at
        ``end``. Also loads the next step's entries (for the symbols ``y_next``) and the symbols
        at ``pos_ahead``. Returns (x, written, next entries, those symbols).

        All uint32, exact: a lane that keeps its 16 bits has x < f << (32 - PROB_BITS), so
        q = x // f < 2**(32 - PROB_BITS) and q * M + r + cum < (q + 1) * M <= 2**32. With
        rcp = floor(2**32 / f) (2**32 - 1 for f = 1), 2**32 / f - 1 < rcp <= 2**32 / f, so
        x * rcp / 2**32 lies in (x / f - 1, x / f] and its floor umulhi(x, rcp) is q or q - 1:
        one correction makes it exact."""
        e_next = tl.load(tab + y_next)
        y_new = _symbols(sym, pos_ahead)
        lo = e.to(tl.uint32)
        f = lo & 0xFFFF
        rcp = (e >> 32).to(tl.uint32)
        emit = (x >> (32 - PROB_BITS)) >= f
        rank, emitted = lane_ranks(emit)
        written += emitted
        # the step's words, in lane order, go before those of the later steps
        word = (x & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(end + (rank - written), word, mask=emit)
        x = tl.where(emit, x >> 16, x)
        q = tl.umulhi(x, rcp)
        r = x - q * f
        over = r >= f
        q = tl.where(over, q + 1, q)
        r = tl.where(over, r - f, r)
        return (q << PROB_BITS) + r + (lo >> 16), written, e_next, y_new

    @triton.jit
    def _encode_kernel(
        chunks_ptr,
        sym_ptr,
        tab_ptr,
        words_ptr,
        states_ptr,
        info_ptr,
        tlo_ptr,
        tlen_ptr,
        entries_ptr,
        n_programs,
        CHUNK: tl.constexpr,
        LANES: tl.constexpr,
        PROB_BITS: tl.constexpr,
        HIST: tl.constexpr,
        UNROLL: tl.constexpr,
    ):
        """Program p encodes the chunk [chunks[2 p], chunks[2 p + 1]) of the block's symbols
        (one warp, its LANES lanes as one vector). Writes its words at the end of the same range of
        the word scratch, its final states at states[p * LANES:], its word count at info[p], its
        table's entries at info[n_programs + p], lo and len - 1 at tlo[p], tlen[p], and the
        entries (f mod M of symbols lo..hi) at entries[p * 256:]. Its encoder table goes to
        tab[p * _TAB:] (entry 256: the identity f = M, cum = 0, for positions past the end)."""
        M: tl.constexpr = 1 << PROB_BITS
        # chunks start at multiples of CHUNK from 16-byte aligned planes
        ALIGN: tl.constexpr = 16 if CHUNK % 16 == 0 else 1
        p = tl.program_id(0).to(tl.int64)
        start = tl.multiple_of(tl.load(chunks_ptr + 2 * p), ALIGN)
        n = (tl.load(chunks_ptr + 2 * p + 1) - start).to(tl.int32)
        sym = sym_ptr + start
        # the prologue: the chunk's histogram (whole tiles unmasked: ALIGN-byte vector loads),
        # frequencies and tables
        counts = tl.zeros((256,), dtype=tl.int32)
        tiles = n // HIST
        for i in range(0, tiles):
            s = tl.load(sym + i * HIST + tl.arange(0, HIST)).to(tl.int32)
            counts += tl.histogram(s, 256)
        for j in range(tiles * HIST, n, 32):  # the rest (a tensor's last chunk), 32 at a time
            offs = j + tl.arange(0, 32)
            s = tl.load(sym + offs, mask=offs < n, other=0).to(tl.int32)
            counts += tl.histogram(s, 256, mask=offs < n)
        freq = _normalize(counts, n, PROB_BITS)
        idx = tl.arange(0, 256)
        lo = tl.min(tl.where(freq > 0, idx, 256), 0)
        hi = tl.max(tl.where(freq > 0, idx, -1), 0)
        tl.store(tlo_ptr + p, lo.to(tl.uint8))
        tl.store(tlen_ptr + p, (hi - lo).to(tl.uint8))
        tl.store(info_ptr + n_programs + p, hi - lo + 1)
        kept = (idx >= lo) & (idx <= hi)
        tl.store(entries_ptr + p * 256 + idx - lo, (freq & (M - 1)).to(tl.int16), mask=kept)
        # rcp = floor(2**32 / f): (2**32 - 1) // f, plus 1 where f divides 2**32 (a power of 2)
        f = freq.to(tl.uint32)
        pow2 = ((f & (f - 1)) == 0).to(tl.uint32)
        rcp = tl.where(f > 1, 0xFFFFFFFF // tl.maximum(f, 1) + pow2, 0xFFFFFFFF)
        cum = (tl.cumsum(freq, 0) - freq).to(tl.uint32)
        entry = (rcp.to(tl.uint64) << 32) | (f | (cum << 16)).to(tl.uint64)
        tab = tab_ptr + p * _TAB
        tl.store(tab + idx, entry.to(tl.int64, bitcast=True))
        tl.store(tab + 256, M | ((1 << (32 - PROB_BITS)) << 32))  # identity: rcp = 2**32 / M
        # Triton allocates no shared memory on request, so the table goes through global memory
        # (L1-resident: 2 KiB); the barrier orders its stores before other lanes' loads
        tl.debug_barrier()
        # the step loop, from the last step to the first, four steps per trip. e: this step's
        # table entries (loaded a step earlier, from L1); y0..y3: the symbols of the next four
        # steps, each loaded from the plane five steps before its own (its latency overlaps
        # the steps between; four registers in turn, no copies). The last step (the first
        # encoded) may end past the chunk: its lanes there read the identity entry 256.
        lanes = tl.arange(0, LANES)
        steps = (n + LANES - 1) // LANES
        pos = (steps - 1) * LANES + lanes  # this step's positions
        top = tl.load(sym + pos, mask=pos < n, other=0).to(tl.int32)
        e = tl.load(tab + tl.where(pos < n, top, 256))
        y0 = _symbols(sym, pos - LANES)
        y1 = _symbols(sym, pos - 2 * LANES)
        y2 = _symbols(sym, pos - 3 * LANES)
        y3 = _symbols(sym, pos - 4 * LANES)
        x = tl.full((LANES,), 65536, tl.uint32)
        written = tl.zeros((), dtype=tl.int32)  # words of the steps after this one
        end = words_ptr + start + n
        tl.static_assert(UNROLL == 4, "the step loop below is written out for 4 steps a trip")
        for _ in range(0, steps // UNROLL):
            x, written, e, y0 = _step(x, written, e, y0, pos - 5 * LANES, sym, tab, end, PROB_BITS)
            x, written, e, y1 = _step(x, written, e, y1, pos - 6 * LANES, sym, tab, end, PROB_BITS)
            x, written, e, y2 = _step(x, written, e, y2, pos - 7 * LANES, sym, tab, end, PROB_BITS)
            x, written, e, y3 = _step(x, written, e, y3, pos - 8 * LANES, sym, tab, end, PROB_BITS)
            pos -= 4 * LANES
        for _ in range(0, steps % UNROLL):  # the last 1-3 steps, the symbols passed along
            x, written, e, y0 = _step(x, written, e, y0, pos - 5 * LANES, sym, tab, end, PROB_BITS)
            y0, y1, y2, y3 = y1, y2, y3, y0
            pos -= LANES
        tl.store(states_ptr + p * LANES + lanes, x.to(tl.int32, bitcast=True))
        tl.store(info_ptr + p, written)


_HIST = 1024  # symbols per histogram tile (32 per thread of the program's warp)
# Words gathered per torch pass of the compaction: its index buffers (2 x 8 bytes per word) and
# gathered words then take at most 36 MiB (budget.ENCODE_FIXED_BYTES counts them)
_GATHER_WORDS = 1 << 21


def _empty_stream(dev: torch.device) -> AnsStream:
    def z(dtype: torch.dtype, n: int = 0) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype, device=dev)

    return AnsStream(
        z(torch.int16),
        z(torch.int32),
        z(torch.int32, 1),
        z(torch.uint8),
        z(torch.uint8),
        z(torch.uint8),
    )


def _symbol_buffer(flat: list[torch.Tensor], base: np.ndarray) -> torch.Tensor:
    """The planes back to back, plane t from byte base[t] (a multiple of 16: the kernel's
    histogram loads 16 bytes at a time): one concatenation, or the one plane as it is."""
    if len(flat) == 1 and flat[0].data_ptr() % 16 == 0:
        return flat[0]
    zeros = flat[0].new_zeros(16)
    pieces = []
    for t, s in enumerate(flat):
        pieces += [s, zeros[: int(base[t + 1] - base[t]) - s.numel()]]
    return torch.cat(pieces)


def _to_device(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A host-built int64 array on ``dev``; on CUDA pinned and queued, not waited for."""
    t = torch.from_numpy(a)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t.to(dev)


def _gather_words(
    scratch: torch.Tensor,
    counts: torch.Tensor,
    chunk_ends: torch.Tensor,
    offsets: torch.Tensor,
    count_host: np.ndarray,
    total: int,
) -> torch.Tensor:
    """The words of every chunk, back to back: chunk p's ``counts[p]`` words end at
    ``chunk_ends[p]`` of the scratch and go to ``offsets[p]`` (device int64 [P + 1]);
    ``count_host``: the counts on the host. In passes of whole chunks of at most _GATHER_WORDS
    words (or one chunk)."""
    words = torch.empty(total, dtype=torch.int16, device=scratch.device)
    shift = chunk_ends - counts - offsets[:-1]  # word j of chunk p is scratch[j + shift[p]]
    ends = np.cumsum(count_host)
    P, p0 = len(count_host), 0
    while p0 < P:
        w0 = int(ends[p0 - 1]) if p0 else 0
        p1 = max(p0 + 1, int(np.searchsorted(ends, w0 + _GATHER_WORDS, side="right")))
        p1 = min(p1, P)
        w1 = int(ends[p1 - 1])
        if w1 > w0:
            src = torch.repeat_interleave(shift[p0:p1], counts[p0:p1], output_size=w1 - w0)
            src += torch.arange(w0, w1, device=scratch.device)
            words[w0:w1] = scratch[src]
        p0 = p1
    return words


def _pack_tables(
    entries: torch.Tensor,
    n_entries: torch.Tensor,
    n_total: int,
    first: torch.Tensor,
    bit_base: torch.Tensor,
    n_bytes: int,
    prob_bits: int,
) -> torch.Tensor:
    """Every chunk's table entries (``entries[p * 256 + k]``, k < n_entries[p]) as each tensor's
    little-endian bit stream of prob_bits-bit fields, the tensors' streams back to back, each
    from a byte: uint8 [n_bytes]. ``first[p]``: the first chunk of p's tensor; ``bit_base[p]``:
    the bit where that tensor's stream starts (device int64 [P]); ``n_total``: all entries."""
    dev = entries.device
    ends = torch.cumsum(n_entries, 0)
    starts = ends - n_entries
    chunk = torch.repeat_interleave(
        torch.arange(n_entries.numel(), device=dev), n_entries, output_size=n_total
    )
    j = torch.arange(n_total, device=dev)
    value = entries[chunk * 256 + j - starts[chunk]].to(torch.int64)
    bit = bit_base[chunk] + (j - starts[first[chunk]]) * prob_bits
    v = value << (bit & 7)
    byte = bit >> 3
    out = torch.zeros(n_bytes + 2, dtype=torch.int64, device=dev)
    for k in range(3):  # a field spans at most 3 bytes; fields share no bit, so + is |
        out.index_add_(0, byte + k, (v >> (8 * k)) & 0xFF)
    return out[:n_bytes].to(torch.uint8)


def encode_block_triton(
    symbol_tensors: list[torch.Tensor],
    chunk_size: int = DEFAULT_CHUNK,
    lanes: int = DEFAULT_LANES,
    prob_bits: int = DEFAULT_PROB_BITS,
) -> list[AnsStream]:
    """The streams :func:`ans.encode` writes for each symbol plane (uint8, any shape, all on one
    device: CUDA, or the CPU under Triton's interpreter), bit for bit: one kernel launch over
    all their chunks (see the module docstring).

    One host sync: the chunks' word and table-entry counts, which size the outputs. The chunk
    table and index arrays (host-built from the sizes) cross once, queued, before the launch.
    Device scratch beyond the outputs: the concatenated symbols (n bytes, when several planes),
    the word scratch (2 n bytes), ~2.6 KiB per chunk, and the gather's index buffers (at most
    2 x 8 bytes x _GATHER_WORDS).
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    if chunk_size % lanes:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of lanes ({lanes})")
    flat = [s.reshape(-1) for s in symbol_tensors]
    if not flat:
        return []
    dev = flat[0].device
    if any(s.device != dev or s.dtype != torch.uint8 for s in flat):
        raise ValueError("encode_block_triton takes uint8 symbol planes on one device")
    sizes = np.array([s.numel() for s in flat], dtype=np.int64)
    chunks = np.array([n_chunks(int(n), chunk_size) for n in sizes], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(chunks)])  # tensor t: programs first[t]..first[t+1]
    P, T = int(first[-1]), len(flat)
    if P == 0:
        return [_empty_stream(dev) for _ in flat]
    # tensor t's symbols: base[t]..base[t] + sizes[t] of the block's buffer, each from 16 bytes
    base = np.concatenate([[0], np.cumsum(-(-sizes // 16) * 16)])
    # the chunk table (start, end of each chunk), then per tensor the chunks whose word offsets
    # it takes (C + 1) and its first chunk (C + 1 times), then each chunk's tensor and that
    # tensor's first chunk: one copy to the device
    starts = np.concatenate(
        [np.arange(b, b + n, chunk_size) for b, n in zip(base[:-1], sizes, strict=True)]
    )
    tensor_of = np.repeat(np.arange(T), chunks)
    ends = np.minimum(starts + chunk_size, (base[:-1] + sizes)[tensor_of])
    host = np.concatenate(
        [
            np.stack([starts, ends], axis=1).reshape(-1),
            *[np.arange(a, b + 1) for a, b in itertools.pairwise(first)],
            np.repeat(first[:-1], chunks + 1),
            tensor_of,
            first[tensor_of],
        ]
    )
    table = _to_device(host, dev)
    chunk_table, rest = table[: 2 * P], table[2 * P :]
    woff_at, woff_from = rest[: P + T], rest[P + T : 2 * (P + T)]
    tensor_dev, first_dev = rest[2 * (P + T) : 2 * (P + T) + P], rest[2 * (P + T) + P :]
    sym = _symbol_buffer(flat, base)
    scratch = torch.empty(int(base[-1]), dtype=torch.int16, device=dev)
    states = torch.empty(P * lanes, dtype=torch.int32, device=dev)
    info = torch.empty(2 * P, dtype=torch.int32, device=dev)
    tlo = torch.empty(P, dtype=torch.uint8, device=dev)
    tlen = torch.empty(P, dtype=torch.uint8, device=dev)
    entries = torch.empty(P * 256, dtype=torch.int16, device=dev)
    workspace = torch.empty(P * _TAB_ENTRIES, dtype=torch.int64, device=dev)
    _encode_kernel[(P,)](
        chunk_table,
        sym,
        workspace,
        scratch,
        states,
        info,
        tlo,
        tlen,
        entries,
        P,
        CHUNK=chunk_size,
        LANES=lanes,
        PROB_BITS=prob_bits,
        HIST=min(_HIST, triton.next_power_of_2(chunk_size)),
        UNROLL=4,  # steps per trip of the step loop (the performance model reads it)
        num_warps=1,
    )
    del workspace
    # the block's one host sync: words and table entries of each chunk size the outputs
    counted = info.cpu().numpy().astype(np.int64)
    words_of, entries_of = counted[:P], counted[P:]
    counts = info[:P].to(torch.int64)
    offsets = torch.zeros(P + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=offsets[1:])
    word_at = np.concatenate([[0], np.cumsum(words_of)])
    words = _gather_words(scratch, counts, chunk_table[1::2], offsets, words_of, int(word_at[-1]))
    del scratch
    word_offsets = (offsets[woff_at] - offsets[woff_from]).to(torch.int32)
    # each tensor's table stream starts on a byte
    entry_at = np.concatenate([[0], np.cumsum(entries_of)])
    entries_per_tensor = entry_at[first[1:]] - entry_at[first[:-1]]
    nbytes = (entries_per_tensor * prob_bits + 7) // 8  # ans.table_nbytes
    byte_at = np.concatenate([[0], np.cumsum(nbytes)]).astype(np.int64)
    bit_base = _to_device(byte_at[:-1] * 8, dev)[tensor_dev]
    packed = _pack_tables(
        entries,
        info[P:].to(torch.int64),
        int(entry_at[-1]),
        first_dev,
        bit_base,
        int(byte_at[-1]),
        prob_bits,
    )
    out = []
    for t in range(T):
        a, b = int(first[t]), int(first[t + 1])
        out.append(
            AnsStream(
                words=words[word_at[a] : word_at[b]],
                states=states[a * lanes : b * lanes],
                word_offsets=word_offsets[a + t : b + t + 1],
                table_lo=tlo[a:b],
                table_len=tlen[a:b],
                table_freq=packed[byte_at[t] : byte_at[t + 1]],
            )
        )
    return out


def encode_triton(
    symbols: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    lanes: int = DEFAULT_LANES,
    prob_bits: int = DEFAULT_PROB_BITS,
) -> AnsStream:
    """One symbol plane's stream (:func:`encode_block_triton` of one tensor)."""
    return encode_block_triton([symbols], chunk_size, lanes, prob_bits)[0]
