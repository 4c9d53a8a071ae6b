"""Warp-level helpers the rANS Triton decoder (ans_triton.py) and encoder
(ans_encode_triton.py) share: a chunk's lanes ranked by a ballot and population counts."""

from __future__ import annotations

from . import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _bit_or(a, b):
        return a | b

    @triton.jit
    def _popcount(v):
        """Set bits of each uint32 (SWAR: the same integer steps compiled and interpreted)."""
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return (v * 0x01010101) >> 24

    @triton.jit
    def lane_ranks(flag):
        """For a boolean vector over a chunk's lanes: each lane's count of set lanes below it,
        and the set lanes in all (int32). Up to 32 lanes: a ballot (OR-reduce: one REDUX.OR)
        and population counts; 64 (two per thread): a ballot per half, 32-63 after 0-31; more:
        a prefix sum. The rANS decoder ranks the lanes that read a word, the encoder those that
        write one."""
        W: tl.constexpr = flag.shape[0]
        lanes = tl.arange(0, W)
        if W <= 32:
            bit = tl.full((W,), 1, tl.uint32) << lanes.to(tl.uint32)  # loop-invariant
            below = bit - 1
            ballot = tl.reduce(tl.where(flag, bit, 0), 0, _bit_or)
            rank = _popcount(ballot & below).to(tl.int32)
            total = _popcount(ballot).to(tl.int32)
        elif W == 64:
            upper = lanes >= 32
            lane_bit = tl.full((W,), 1, tl.uint32) << (lanes & 31).to(tl.uint32)
            below = lane_bit - 1
            bit = tl.where(flag, lane_bit, 0)
            low = tl.reduce(tl.where(upper, 0, bit), 0, _bit_or)
            high = tl.reduce(tl.where(upper, bit, 0), 0, _bit_or)
            n_low = _popcount(low).to(tl.int32)
            rank = _popcount(tl.where(upper, high, low) & below).to(tl.int32)
            rank += tl.where(upper, n_low, 0)
            total = n_low + _popcount(high).to(tl.int32)
        else:
            rank = tl.cumsum(flag.to(tl.int32), 0) - flag.to(tl.int32)
            total = tl.sum(flag.to(tl.int32), 0)
        return rank, total
