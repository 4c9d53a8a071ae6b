"""The Triton twin of the rANS decoder in ans.py: the fused GPU decoder.

The decoder is the scheduler's GPU path. One launch covers every chunk of several tensors that
share a kernel specialization (a block's, e.g. a layer's 7 matrices, or one tensor): a small
tensor table (one int64 row per tensor: its offsets into the storages its planes and output
view, its size, its first program) tells each program which tensor and chunk it decodes. Each
program, one warp per chunk, first builds its chunk's decode tables from the compact tables
into its own 5 KB of the workspace (a symbol byte per slot, an (f, cum) word per entry),
then walks its W lanes as one vector, 4 steps a trip (a lane's word position from a 32-lane
ballot and population counts), and writes finished floats, merging each step's symbols with
raw bits loaded 4 steps ahead (planes_triton.load_raw / merge_raw). So a block costs 1 launch
(there were 2 per tensor, then 2 per block). The device encoder is in
ans_encode_triton.py. Streams, tables and their layout are ans.py's; both sides are tested
against its CPU reference.
"""

from __future__ import annotations

import torch

from . import HAS_TRITON, planes, planes_triton
from .ans import (
    DEFAULT_CHUNK,
    DEFAULT_LANES,
    DEFAULT_PROB_BITS,
    TABLE_GUARD_BYTES,
    AnsStream,
    n_chunks,
    table_words,
)
from .ans_jobs import DecodeJob, planes_of, same_storages, tensor_table

# ---------------------------------------------------------------------------------------------
# kernels: the decoder (one program per chunk of a block, table build and merge fused)
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .lanes_triton import lane_ranks  # shared with the encoder

    # One launch decodes the chunks of several tensors (a block's, or one tensor's) that share
    # the constexpr specialization: program p works for the tensor whose row of the tensor
    # table has the last first program <= p. A row is _ROW int64 fields; offsets count elements
    # of the base pointer they apply to (a view of the storage all those tensors' planes share).
    _R_PROG = tl.constexpr(0)  # the tensor's first program in the launch
    _R_CHUNK = tl.constexpr(1)  # the chunk that program decodes (0, or a first_chunk)
    _R_N = tl.constexpr(2)  # symbols of the tensor
    _R_WORDS = tl.constexpr(3)  # its words (int16)
    _R_STATES = tl.constexpr(4)  # its final states (int32), LANES per chunk
    _R_WOFF = tl.constexpr(5)  # its word offsets (int32), chunks + 1
    _R_TLO = tl.constexpr(6)  # its tables' first symbols (uint8), one per chunk
    _R_TLEN = tl.constexpr(7)  # its tables' entries - 1 (uint8), one per chunk
    _R_TFREQ = tl.constexpr(8)  # its packed frequencies (uint8)
    _R_TBYTES = tl.constexpr(9)  # bytes of its packed frequencies
    _R_RAW = tl.constexpr(10)  # its raw plane (uint8)
    _R_SCALES = tl.constexpr(11)  # its block scales (uint8)
    _R_OUT = tl.constexpr(12)  # its output (raw bits: uint16, or int32 for fp32)
    _ROW = tl.constexpr(16)
    _GUARD = tl.constexpr(TABLE_GUARD_BYTES)  # workspace bytes before the first program's
    _FMT_LOSSY = tl.constexpr(planes.FMT_LOSSY)

    @triton.jit
    def _row_of(tab_ptr, n_tensors, p, MAX_TENSORS: tl.constexpr):
        """The tensor-table row of program ``p`` (a pointer to its first field)."""
        t = tl.arange(0, MAX_TENSORS)
        first = tl.load(tab_ptr + t * _ROW + _R_PROG, mask=t < n_tensors, other=p + 1)
        row = tl.sum((first <= p).to(tl.int32), 0) - 1
        return tab_ptr + row.to(tl.int64) * _ROW

    @triton.jit
    def _chunk_of(row, p):
        """The chunk of its tensor that program ``p`` decodes (int64)."""
        return p - tl.load(row + _R_PROG) + tl.load(row + _R_CHUNK)

    @triton.jit
    def _table_start(tlen_ptr, c, TILE: tl.constexpr):
        """Where chunk c's entries start in its tensor's packed table: c + len[0] + ... +
        len[c - 1] (a table has len + 1 entries), summed TILE lengths at a time."""
        start = c
        for i in range(0, (c + TILE - 1) // TILE):
            j = i * TILE + tl.arange(0, TILE)
            start += tl.sum(tl.load(tlen_ptr + j, mask=j < c, other=0).to(tl.int64), 0)
        return start

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
    def _build_tables(
        row,
        c,
        tlo_ptr,
        tlen_ptr,
        tfreq_ptr,
        slot_sym,
        sym_fc,
        PROB_BITS: tl.constexpr,
        TILE: tl.constexpr,
        START_TILE: tl.constexpr,
    ):
        """Store chunk c's decode tables, from the compact table the format stores: at slot_sym
        (M uint8) the symbol owning each slot, at sym_fc (int32, one per entry j < len + 1 of the
        table: symbol lo + j) f | cum << 13 (0 for an absent symbol). Returns lo.

        Split so that a program's tables take M + 1 KB (5 KB at 12 bits, not 16 KB of one int32
        entry per slot): a full SM's resident programs keep theirs in L1. Built in two passes,
        neither waiting on a load per slot: the entries, TILE at a time (f, and cum by a prefix
        sum carried across tiles); then, after a barrier, each symbol fills its run of slots
        [cum, cum + f) TILE slots a store. Stores stay inside the M slots whatever the table
        holds (a damaged one leaves slots stale: the chunk then fails its final-state check).
        """
        M: tl.constexpr = 1 << PROB_BITS
        tlen = tlen_ptr + tl.load(row + _R_TLEN)
        freq_ptr = tfreq_ptr + tl.load(row + _R_TFREQ)
        nbytes = tl.load(row + _R_TBYTES)
        t0 = _table_start(tlen, c, START_TILE)
        nsym = tl.load(tlen + c).to(tl.int32) + 1
        lo = tl.load(tlo_ptr + tl.load(row + _R_TLO) + c).to(tl.int32)
        carry = tl.zeros((), dtype=tl.int32)
        for t in range(0, (nsym + TILE - 1) // TILE):
            j = t * TILE + tl.arange(0, TILE)
            f = _table_entry(freq_ptr, t0 + j, nbytes, PROB_BITS)
            f = tl.where(j < nsym, tl.where(nsym == 1, M, f), 0)
            cum = carry + tl.cumsum(f, 0) - f
            carry += tl.sum(f, 0)
            tl.store(sym_fc + j, tl.where(f > 0, f | (cum << 13), 0), mask=j < nsym)
        tl.debug_barrier()  # the entries, stored by all lanes, are read by all lanes below
        ar = tl.arange(0, TILE)
        for j in range(0, nsym):
            fc = tl.load(sym_fc + j)
            f = fc & 0x1FFF
            cum = fc >> 13
            byte = (ar * 0 + lo + j).to(tl.uint8)  # the symbol
            for r in range(0, f, TILE):
                slots = cum + r + ar
                tl.store(slot_sym + slots, byte, mask=(r + ar < f) & (slots < M))
        return lo

    @triton.jit
    def _decode_step(
        x, ptr, end, rel, origin, i, cnt, n, slot_sym, fc_of, words, raw, scales, out,
        r0, r1, r2, r3,
        LANES: tl.constexpr, PROB_BITS: tl.constexpr, FMT: tl.constexpr, K: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, NORMALIZE: tl.constexpr, OUT: tl.constexpr,
        FULL: tl.constexpr,
    ):  # fmt: skip
        """One step of a chunk's lanes, at their indices ``i`` in the chunk (those < ``cnt`` are
        valid; element indices origin + rel + i, where origin (int64) is a multiple of 8 blocks
        at or before the chunk, so that offsets from it are int32 and keep a packed field's byte
        phase; ``out`` points at the origin's element): decode a symbol per valid lane through
        the tables, renormalize (the lanes that need a word take the next ones in lane order),
        merge the symbols with their raw bits (r0..r3, loaded 4 steps earlier), store the floats,
        and load the raw bits of the lanes' step 4 steps later. Invalid lanes keep their state
        and read nothing. With FULL the caller vouches that every lane is valid and so is its
        step 4 steps later: no compare, select or predicate for it (the full trips: all but the
        last one or two of a chunk, none when it has fewer than 8 whole steps). ``words`` points
        at the chunk's first word, ``ptr`` and ``end`` count words from there (int32). Returns
        (states, word pointer, the raw bits loaded)."""
        M: tl.constexpr = 1 << PROB_BITS
        AHEAD: tl.constexpr = 4 * LANES
        slot = x & (M - 1)
        sym = tl.load(slot_sym + slot).to(tl.uint32)
        fc = tl.load(fc_of + sym).to(tl.uint32, bitcast=True)
        x_new = (fc & 0x1FFF) * (x >> PROB_BITS) + slot - (fc >> 13)
        if FULL:
            x = x_new
            need = x < 65536
            valid = None
            ahead = None
        else:
            valid = i < cnt
            x = tl.where(valid, x_new, x)
            need = valid & (x < 65536)
            ahead = i + AHEAD < cnt
        rank, taken = lane_ranks(need)  # a lane's word: the next, past the lanes below it
        pos = ptr + rank
        w = tl.load(words + pos, mask=need & (pos < end), other=0)
        w = w.to(tl.uint16, bitcast=True).to(tl.uint32)
        x = tl.where(need, (x << 16) | w, x)
        planes_triton.merge_raw(
            sym, r0, r1, r2, r3, rel + i, valid, out, FMT, K, BLOCK_SIZE, NORMALIZE, OUT
        )
        r0, r1, r2, r3 = planes_triton.load_raw(
            rel + i + AHEAD, ahead, n, raw, scales, origin, FMT, K, BLOCK_SIZE, NORMALIZE
        )
        return x, ptr + taken, r0, r1, r2, r3

    @triton.jit
    def _decode_trip(
        x, ptr, end, rel, origin, i, cnt, n, slot_sym, fc_of, words, raw, scales, out,
        a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3,
        LANES: tl.constexpr, PROB_BITS: tl.constexpr, FMT: tl.constexpr, K: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, NORMALIZE: tl.constexpr, OUT: tl.constexpr,
        FULL: tl.constexpr,
    ):  # fmt: skip
        """4 steps from lane indices ``i``: each merges its set of raw bits (a, b, c, d) and
        loads the same set for 4 steps later into it (separate registers, never moved: a move
        would wait for the load)."""
        x, ptr, a0, a1, a2, a3 = _decode_step(
            x, ptr, end, rel, origin, i, cnt, n, slot_sym, fc_of, words, raw, scales, out,
            a0, a1, a2, a3, LANES, PROB_BITS, FMT, K, BLOCK_SIZE, NORMALIZE, OUT, FULL,
        )  # fmt: skip
        x, ptr, b0, b1, b2, b3 = _decode_step(
            x, ptr, end, rel, origin, i + LANES, cnt, n, slot_sym, fc_of, words, raw,
            scales, out, b0, b1, b2, b3, LANES, PROB_BITS, FMT, K, BLOCK_SIZE, NORMALIZE,
            OUT, FULL,
        )  # fmt: skip
        x, ptr, c0, c1, c2, c3 = _decode_step(
            x, ptr, end, rel, origin, i + 2 * LANES, cnt, n, slot_sym, fc_of, words, raw,
            scales, out, c0, c1, c2, c3, LANES, PROB_BITS, FMT, K, BLOCK_SIZE, NORMALIZE,
            OUT, FULL,
        )  # fmt: skip
        x, ptr, d0, d1, d2, d3 = _decode_step(
            x, ptr, end, rel, origin, i + 3 * LANES, cnt, n, slot_sym, fc_of, words, raw,
            scales, out, d0, d1, d2, d3, LANES, PROB_BITS, FMT, K, BLOCK_SIZE, NORMALIZE,
            OUT, FULL,
        )  # fmt: skip
        return x, ptr, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3

    @triton.jit
    def _decode_kernel(
        tab_ptr,
        n_tensors,
        words_ptr,
        states_ptr,
        woff_ptr,
        tlo_ptr,
        tlen_ptr,
        tfreq_ptr,
        ws8_ptr,
        ws32_ptr,
        raw_ptr,
        scale_ptr,
        out_ptr,
        status_ptr,
        damage_ptr,
        CHUNK: tl.constexpr,
        LANES: tl.constexpr,
        PROB_BITS: tl.constexpr,
        FMT: tl.constexpr,
        K: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        NORMALIZE: tl.constexpr,
        OUT: tl.constexpr,
        MAX_TENSORS: tl.constexpr,
        COUNT_DAMAGE: tl.constexpr,
        LUT_TILE: tl.constexpr,
        START_TILE: tl.constexpr,
        UNROLL: tl.constexpr,
    ):
        """Program p decodes one chunk of its tensor (1 warp, its LANES lanes as one vector)
        straight into the tensor's output, through the decode tables it first builds in its
        region of the workspace (bytes p * R .. (p + 1) * R, R = M + 1024; ws8_ptr and ws32_ptr
        view the same workspace as uint8 and int32). Writes
        status[p] (1 = the chunk ended in its final state with every word read) and, with
        COUNT_DAMAGE, adds 1 to *damage_ptr when it did not."""
        M: tl.constexpr = 1 << PROB_BITS
        p = tl.program_id(0).to(tl.int64)
        row = _row_of(tab_ptr, n_tensors, p, MAX_TENSORS)
        c = _chunk_of(row, p)
        n = tl.load(row + _R_N)  # int64: element indices c * CHUNK + ... pass 2**31
        words = words_ptr + tl.load(row + _R_WORDS)
        woff = woff_ptr + tl.load(row + _R_WOFF)
        lanes = tl.arange(0, LANES)
        x = tl.load(states_ptr + tl.load(row + _R_STATES) + c * LANES + lanes)
        x = x.to(tl.uint32, bitcast=True)
        first = tl.load(woff + c).to(tl.uint32, bitcast=True).to(tl.int64)
        end = (tl.load(woff + c + 1).to(tl.uint32, bitcast=True).to(tl.int64) - first).to(tl.int32)
        words += first  # the chunk's words; ptr counts from here
        ptr = tl.zeros((), dtype=tl.int32)
        raw = raw_ptr + tl.load(row + _R_RAW)
        scales = scale_ptr + tl.load(row + _R_SCALES)
        out = out_ptr + tl.load(row + _R_OUT)
        base = c * CHUNK
        # Lossy: int32 offsets (a fifth fewer instructions a step) from an origin 8 blocks
        # aligned, so a field's and a scale's byte phase is the offset's. Lossless keeps int64
        # indices from 0 (its int32 form had a raw load scheduled later: BENCHMARKS.md)
        if FMT == _FMT_LOSSY:
            tl.static_assert(8 * BLOCK_SIZE + CHUNK < 2**31, "blocks too large for offsets")
            origin = base - base % (8 * BLOCK_SIZE if NORMALIZE else 8)
            rel = (base - origin).to(tl.int32)
        else:
            origin = 0
            rel = base
        out_o = out + origin
        # the prologue: this program's decode tables, in its own region of the workspace.
        # Triton allocates no shared memory on request, so the tables go through global memory
        # (L1-resident: M + 1024 bytes); the barrier (bar.sync: a CTA's global stores before it
        # are visible to its threads after it) orders the tables' stores before the step
        # loop's loads from other lanes
        # bytes: past the guard, M slot symbols then 256 int32 (f, cum) per program
        region = _GUARD + p * (M + 1024)
        slot_sym = ws8_ptr + region
        sym_fc = ws32_ptr + (region + M) // 4
        lo = _build_tables(
            row, c, tlo_ptr, tlen_ptr, tfreq_ptr, slot_sym, sym_fc, PROB_BITS, LUT_TILE, START_TILE
        )
        tl.debug_barrier()
        fc_of = sym_fc - lo  # entry j is symbol lo + j's: indexed by the symbol from here
        # Raw bits (and scales) load 4 steps before their merge: a trip decodes 4 steps, each
        # merging the set (a, b, c, d) loaded a trip earlier and loading the same set for 4
        # steps later into it. A load's DRAM latency (~550 cycles, more under load) so overlaps
        # ~4 dependent chains of ~250 cycles instead of stalling the next one. The sets are
        # separate registers, never moved (a move would wait for the load). Steps past the
        # chunk's end (the last trip's) are masked: they change no state.
        cnt = tl.minimum(n - base, CHUNK).to(tl.int32)  # lanes' indices i in the chunk: int32
        steps = (cnt + LANES - 1) // LANES
        i = lanes
        a0, a1, a2, a3 = planes_triton.load_raw(
            rel + i, i < cnt, n, raw, scales, origin, FMT, K, BLOCK_SIZE, NORMALIZE
        )
        i += LANES
        b0, b1, b2, b3 = planes_triton.load_raw(
            rel + i, i < cnt, n, raw, scales, origin, FMT, K, BLOCK_SIZE, NORMALIZE
        )
        i += LANES
        c0, c1, c2, c3 = planes_triton.load_raw(
            rel + i, i < cnt, n, raw, scales, origin, FMT, K, BLOCK_SIZE, NORMALIZE
        )
        i += LANES
        d0, d1, d2, d3 = planes_triton.load_raw(
            rel + i, i < cnt, n, raw, scales, origin, FMT, K, BLOCK_SIZE, NORMALIZE
        )
        tl.static_assert(UNROLL == 4, "the step loops below are written out for 4 steps a trip")
        # the full trips first: all 4 steps' lanes valid, and those of the 4 steps they load
        # raw bits for (steps s .. s + 7 < cnt // LANES); then the rest, masked (1 or 2 trips)
        full = cnt // LANES
        full_end = tl.maximum(full - 4, 0) // UNROLL * UNROLL
        for s in range(0, full_end, UNROLL):
            x, ptr, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3 = _decode_trip(
                x, ptr, end, rel, origin, s * LANES + lanes, cnt, n, slot_sym, fc_of, words,
                raw, scales, out_o, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1,
                d2, d3, LANES, PROB_BITS, FMT, K, BLOCK_SIZE, NORMALIZE, OUT, True,
            )  # fmt: skip
        for s in range(full_end, steps, UNROLL):
            x, ptr, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3 = _decode_trip(
                x, ptr, end, rel, origin, s * LANES + lanes, cnt, n, slot_sym, fc_of, words,
                raw, scales, out_o, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1,
                d2, d3, LANES, PROB_BITS, FMT, K, BLOCK_SIZE, NORMALIZE, OUT, False,
            )  # fmt: skip
        ok = (tl.sum((x != 65536).to(tl.int32), 0) == 0) & (ptr == end)
        tl.store(status_ptr + p, ok.to(tl.int8))
        if COUNT_DAMAGE:
            tl.atomic_add(damage_ptr, 1 - ok.to(tl.int32), sem="relaxed")


# Table entries per trip, and slots per store, of the decode kernel's table build: 1 per thread
# of its one warp (wider vectors raise the prologue's registers, and with them the kernel's: it
# stays <= 69 on sm_80-90; one vector of all 4096 slots once used ~255 and spilled)
_LUT_TILE = 32
# Table lengths summed per trip when a program finds where its chunk's table starts (the sum of
# the lengths before it: c / START_TILE dependent trips, 8 bytes per thread each)
_START_TILE = 256
_MAX_TENSORS = 32  # tensors per launch (the program → tensor search is one vector this wide)


def _launch(
    jobs: list[DecodeJob],
    fmt: int,
    mantissa_bits: int,
    block_size: int,
    chunk_size: int,
    lanes: int,
    prob_bits: int,
    workspace: torch.Tensor | None,
    damage: torch.Tensor | None,
) -> torch.Tensor:
    """The decode launch over all chunks of ``jobs`` (planes in shared storages)."""
    dev = jobs[0].out.device
    table, bases, programs = tensor_table(jobs, chunk_size)
    need = table_words(programs, prob_bits)
    if workspace is None or workspace.numel() < need:
        workspace = torch.empty(need, dtype=torch.int32, device=dev)
    status = torch.empty(programs, dtype=torch.int8, device=dev)
    _decode_kernel[(programs,)](
        table,
        len(jobs),
        bases["words"],
        bases["states"],
        bases["word_offsets"],
        bases["table_lo"],
        bases["table_len"],
        bases["table_freq"],
        workspace.view(torch.uint8),
        workspace,
        bases["raw"],
        bases["scales"],
        bases["out"],
        status,
        status if damage is None else damage,
        CHUNK=chunk_size,
        LANES=lanes,
        PROB_BITS=prob_bits,
        FMT=fmt,
        K=mantissa_bits,
        BLOCK_SIZE=block_size,
        NORMALIZE=jobs[0].scales is not None,
        OUT=planes.FMT_OF[jobs[0].out.dtype],
        MAX_TENSORS=_MAX_TENSORS,
        COUNT_DAMAGE=damage is not None,
        LUT_TILE=_LUT_TILE,  # <= 256 <= M: prob_bits >= 8
        START_TILE=_START_TILE,
        UNROLL=4,  # steps per trip of the step loop (the performance model reads it)
        num_warps=1,
    )
    return status


def decode_block_triton(
    jobs: list[DecodeJob],
    *,
    fmt: int,
    mantissa_bits: int = 0,
    block_size: int = 1,
    chunk_size: int = DEFAULT_CHUNK,
    lanes: int = DEFAULT_LANES,
    prob_bits: int = DEFAULT_PROB_BITS,
    workspace: torch.Tensor | None = None,
    damage: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode several tensors coded with the same settings (a block's) into their outputs: one
    launch over the chunks of all of them. Returns int8 status per
    decoded chunk (1 = ok), the jobs' chunks in order.

    One launch covers jobs whose planes of each kind view one storage (a packed block's buffer)
    and whose outputs view one storage (a slot); other jobs take further launches, on the same
    stream. Outputs share one dtype, and scales are given for all jobs or none. No host
    synchronization: the tensor table is queued to the device on the current stream.
    ``workspace`` (int32, >= chunks * 2**prob_bits) holds the slot tables (a launch reuses it
    from the start: launches on one stream run in order); ``damage`` (int32 [1]), when given,
    counts the damaged chunks on the device.
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    dev = jobs[0].out.device if jobs else None
    jobs = [j for j in jobs if n_chunks(j.out.numel(), chunk_size) > j.first_chunk]
    if not jobs:
        return torch.zeros(0, dtype=torch.int8, device=dev)
    if len({j.out.dtype for j in jobs}) > 1 or len({j.scales is None for j in jobs}) > 1:
        raise ValueError("a decode launch takes outputs of one dtype, all with scales or none")
    groups: list[list[DecodeJob]] = []
    for j in jobs:  # consecutive jobs whose planes share storages go in one launch
        g = groups[-1] if groups else None
        if g and len(g) < _MAX_TENSORS and same_storages(planes_of(g[0]), planes_of(j)):
            g.append(j)
        else:
            groups.append([j])
    kw = dict(fmt=fmt, mantissa_bits=mantissa_bits, block_size=block_size)
    kw.update(chunk_size=chunk_size, lanes=lanes, prob_bits=prob_bits)
    status = [_launch(g, workspace=workspace, damage=damage, **kw) for g in groups]
    return status[0] if len(status) == 1 else torch.cat(status)


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
    """Decode one (validated) stream straight into ``out`` (1-D). Returns int8 status per chunk.

    No host synchronization: the status stays on the device for the caller to check when it
    chooses. ``workspace`` (int32, >= n_chunks * 2**prob_bits) holds the slot tables.
    ``first_chunk`` > 0 decodes only chunks [first_chunk, n_chunks) (their statuses; the others
    stay 0): tests use it to reach the indices of very large tensors.
    """
    C = n_chunks(out.numel(), chunk_size)
    if not 0 <= first_chunk <= C:
        raise ValueError(f"first_chunk must be in 0..{C}, got {first_chunk}")
    if first_chunk == C:
        return torch.zeros(C, dtype=torch.int8, device=out.device)
    status = decode_block_triton(
        [DecodeJob(stream, raw, scales, out, first_chunk)],
        fmt=fmt,
        mantissa_bits=mantissa_bits,
        block_size=block_size,
        chunk_size=chunk_size,
        lanes=lanes,
        prob_bits=prob_bits,
        workspace=workspace,
    )
    if first_chunk:  # the chunks before it were not decoded
        status = torch.cat([torch.zeros(first_chunk, dtype=torch.int8, device=out.device), status])
    return status
