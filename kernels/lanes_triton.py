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
        and population counts; 32 * G lanes (G per thread, G <= 4: ans.MAX_LANES): a ballot
        per group of 32, each group's ranks after the groups below it (no prefix sum, which
        costs 5 shuffles and their waits). The rANS decoder ranks the lanes that read a word,
        the encoder those that write one."""
        W: tl.constexpr = flag.shape[0]
        lanes = tl.arange(0, W)
        if W <= 32:
            bit = tl.full((W,), 1, tl.uint32) << lanes.to(tl.uint32)  # loop-invariant
            below = bit - 1
            ballot = tl.reduce(tl.where(flag, bit, 0), 0, _bit_or)
            rank = _popcount(ballot & below).to(tl.int32)
            total = _popcount(ballot).to(tl.int32)
        else:
            tl.static_assert(W % 32 == 0, "more than 32 lanes come in groups of 32")
            group = lanes >> 5
            lane_bit = tl.full((W,), 1, tl.uint32) << (lanes & 31).to(tl.uint32)
            bit = tl.where(flag, lane_bit, 0)
            mine = tl.zeros((W,), tl.uint32)  # the ballot of each lane's group
            before = tl.zeros((W,), tl.int32)  # the set lanes of the groups below it
            total = tl.zeros((), tl.int32)
            for g in tl.static_range(W // 32):
                in_g = group == g
                ballot = tl.reduce(tl.where(in_g, bit, 0), 0, _bit_or)
                mine = tl.where(in_g, ballot, mine)
                before = tl.where(in_g, total, before)
                total += _popcount(ballot).to(tl.int32)
            rank = _popcount(mine & (lane_bit - 1)).to(tl.int32) + before
        return rank, total
