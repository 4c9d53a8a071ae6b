"""kernels/ans.py: the rANS coder's CPU reference against itself (its twin: test_ans_triton.py)."""

from __future__ import annotations

import pytest
import torch

from neuzip_offload.kernels import ans
from tests.kernels.inputs import symbols


@pytest.mark.parametrize("kind", ["single", "uniform", "two", "skewed"])
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 255, 256, 257, 5000])
def test_round_trip_small_chunks(kind, n):
    sym = symbols(n, kind)
    st = ans.encode(sym, chunk_size=256, lanes=32, prob_bits=10)
    assert ans.validate(st, n, 256, 32, 10) is None
    out, ok = ans.decode(st, n, 256, 32, 10)
    assert torch.equal(out, sym) and bool(ok.all())


@pytest.mark.parametrize(
    ("chunk_size", "lanes", "prob_bits"),
    [(1 << 16, 32, 12), (1024, 8, 12), (64, 64, 8), (4096, 16, 11)],
)
def test_round_trip_settings(chunk_size, lanes, prob_bits):
    n = 3 * chunk_size + 17
    sym = symbols(n, "skewed", seed=chunk_size)
    st = ans.encode(sym, chunk_size, lanes, prob_bits)
    out, ok = ans.decode(st, n, chunk_size, lanes, prob_bits)
    assert torch.equal(out, sym) and bool(ok.all())


def test_batched_encode_and_decode_equal_one_by_one():
    planes_ = [
        symbols(n, k, seed=n)
        for n, k in [(700, "skewed"), (0, "uniform"), (1, "single"), (2000, "two")]
    ]
    together = ans.encode_many(planes_, 256, 32, 10)
    for p, st in zip(planes_, together, strict=True):
        alone = ans.encode(p, 256, 32, 10)
        for field in ("words", "states", "word_offsets", "table_lo", "table_len", "table_freq"):
            assert torch.equal(getattr(alone, field), getattr(st, field)), field
    outs, oks = ans.decode_many(together, [p.numel() for p in planes_], 256, 32, 10)
    for p, o, ok in zip(planes_, outs, oks, strict=True):
        assert torch.equal(p, o) and bool(ok.all())


def test_encoding_in_several_passes_equals_one(monkeypatch):
    """Chunks are encoded a bounded number at a time; the split between passes changes nothing."""
    sym = symbols(5000, "skewed", seed=3)
    one = ans.encode(sym, 256, 32, 10)
    monkeypatch.setattr(ans, "_MAX_PASS_SYMBOLS", 3 * 256)
    several = ans.encode(sym, 256, 32, 10)
    for field in ("words", "states", "word_offsets", "table_lo", "table_len", "table_freq"):
        assert torch.equal(getattr(one, field), getattr(several, field)), field


def test_compresses_close_to_the_entropy():
    sym = symbols(1 << 18, "skewed")
    st = ans.encode(sym)
    p = torch.bincount(sym.long(), minlength=256).double() / sym.numel()
    h = float(-(p[p > 0] * p[p > 0].log2()).sum())
    coded = 16 * st.words.numel() + 32 * st.states.numel()
    # a lane's final state is 32 bits of which ~8 carry payload (it starts at 2**16): the
    # rest is the lanes' fixed cost; the coding itself is within 0.02 bits of the entropy
    assert coded / sym.numel() < h + 0.02 + 24 * st.states.numel() / sym.numel()
    assert coded / sym.numel() > h


def test_normalized_tables_sum_to_m_and_keep_every_symbol():
    counts = torch.zeros(3, 256, dtype=torch.int64)
    counts[0, :] = 1  # all 256 symbols once
    counts[1, 7] = 10**6  # one symbol
    counts[2, :200] = 1
    counts[2, 250] = 10**7  # 200 rare symbols beside a dominant one
    freq = ans.normalize_counts(counts, 12)
    assert torch.equal(freq.sum(dim=1), torch.full((3,), 4096))
    assert torch.equal(freq > 0, counts > 0)


def test_damaged_stream_is_reported_not_read_out_of_bounds():
    sym = symbols(3000, "skewed")
    st = ans.encode(sym, 256, 32, 10)
    st.states[5] ^= 0x1234  # a wrong start state: the lane cannot end at L
    _, ok = ans.decode(st, 3000, 256, 32, 10)
    assert not bool(ok[0]) and bool(ok[1:].all())
    st = ans.encode(sym, 256, 32, 10)
    st.words[:] = -1  # garbage words: every chunk ends in the wrong place or state
    _, ok = ans.decode(st, 3000, 256, 32, 10)
    assert not bool(ok.any())


def test_validate_names_what_is_wrong():
    st = ans.encode(symbols(1000, "skewed"), 256, 32, 10)
    assert ans.validate(st, 1000, 256, 32, 10) is None
    assert "states" in ans.validate(st, 2000, 256, 32, 10)
    bad = ans.AnsStream(**{**st.__dict__, "word_offsets": st.word_offsets.flip(0)})
    assert "word offsets" in ans.validate(bad, 1000, 256, 32, 10)
    freq = st.table_freq.clone()
    freq[0] ^= 0x5
    bad = ans.AnsStream(**{**st.__dict__, "table_freq": freq})
    assert "sum" in ans.validate(bad, 1000, 256, 32, 10)
