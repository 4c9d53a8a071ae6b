"""kernels/ans.py: the rANS coder, CPU reference against itself and against the Triton decoder."""

from __future__ import annotations

import pytest
import torch

from neuzip_offload.kernels import ans, planes
from tests.helpers import TRITON_DEVICE, requires_triton, same_bits


def _symbols(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "single":
        return torch.full((n,), 123, dtype=torch.uint8)
    if kind == "uniform":
        return torch.randint(0, 256, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    if kind == "two":
        return (torch.rand(n, generator=g) < 0.999).to(torch.uint8) * 200
    # exponent-like: geometric around 120
    return (120 + torch.distributions.Geometric(0.4).sample((n,)).clamp(max=100)).to(torch.uint8)


@pytest.mark.parametrize("kind", ["single", "uniform", "two", "skewed"])
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 255, 256, 257, 5000])
def test_round_trip_small_chunks(kind, n):
    sym = _symbols(n, kind)
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
    sym = _symbols(n, "skewed", seed=chunk_size)
    st = ans.encode(sym, chunk_size, lanes, prob_bits)
    out, ok = ans.decode(st, n, chunk_size, lanes, prob_bits)
    assert torch.equal(out, sym) and bool(ok.all())


def test_batched_encode_and_decode_equal_one_by_one():
    planes_ = [
        _symbols(n, k, seed=n)
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
    sym = _symbols(5000, "skewed", seed=3)
    one = ans.encode(sym, 256, 32, 10)
    monkeypatch.setattr(ans, "_MAX_PASS_SYMBOLS", 3 * 256)
    several = ans.encode(sym, 256, 32, 10)
    for field in ("words", "states", "word_offsets", "table_lo", "table_len", "table_freq"):
        assert torch.equal(getattr(one, field), getattr(several, field)), field


def test_compresses_close_to_the_entropy():
    sym = _symbols(1 << 18, "skewed")
    st = ans.encode(sym)
    p = torch.bincount(sym.long(), minlength=256).double() / sym.numel()
    h = float(-(p[p > 0] * p[p > 0].log2()).sum())
    coded = 16 * st.words.numel() + 32 * st.states.numel()
    assert coded / sym.numel() < h + 0.02


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
    sym = _symbols(3000, "skewed")
    st = ans.encode(sym, 256, 32, 10)
    st.states[5] ^= 0x1234  # a wrong start state: the lane cannot end at L
    _, ok = ans.decode(st, 3000, 256, 32, 10)
    assert not bool(ok[0]) and bool(ok[1:].all())
    st = ans.encode(sym, 256, 32, 10)
    st.words[:] = -1  # garbage words: every chunk ends in the wrong place or state
    _, ok = ans.decode(st, 3000, 256, 32, 10)
    assert not bool(ok.any())


def test_validate_names_what_is_wrong():
    st = ans.encode(_symbols(1000, "skewed"), 256, 32, 10)
    assert ans.validate(st, 1000, 256, 32, 10) is None
    assert "states" in ans.validate(st, 2000, 256, 32, 10)
    bad = ans.AnsStream(**{**st.__dict__, "word_offsets": st.word_offsets.flip(0)})
    assert "word offsets" in ans.validate(bad, 1000, 256, 32, 10)
    freq = st.table_freq.clone()
    freq[0] ^= 0x5
    bad = ans.AnsStream(**{**st.__dict__, "table_freq": freq})
    assert "sum" in ans.validate(bad, 1000, 256, 32, 10)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_decoder_matches_reference_lossless(dtype):
    x = (torch.randn(1500) * torch.logspace(-3, 2, 1500)).to(dtype)
    x[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    sym, raw = planes.split(x)
    st = ans.encode(sym, chunk_size=256, lanes=32, prob_bits=10)
    dev = TRITON_DEVICE
    st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
    out = torch.empty(x.numel(), dtype=dtype, device=dev)
    status = ans.decode_triton(
        st, raw.to(dev), None, out, fmt=planes.FMT_OF[dtype], chunk_size=256, lanes=32, prob_bits=10
    )
    assert bool(status.all())
    assert same_bits(out.cpu(), x)


@requires_triton
@pytest.mark.parametrize(
    ("k", "normalize", "dtype"),
    [(3, True, torch.bfloat16), (0, True, torch.float32), (7, False, torch.float16)],
)
def test_triton_decoder_matches_reference_lossy(k, normalize, dtype):
    x = (torch.randn(1200) * 0.05).to(dtype)
    sym, field, scales = planes.lossy_split(x, k, 128, normalize)
    ref = planes.lossy_merge(sym, field, scales, k, 128, dtype)
    st = ans.encode(sym, chunk_size=512, lanes=32, prob_bits=12)
    dev = TRITON_DEVICE
    st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
    out = torch.empty(x.numel(), dtype=dtype, device=dev)
    status = ans.decode_triton(
        st,
        field.to(dev),
        None if scales is None else scales.to(dev),
        out,
        fmt=planes.FMT_LOSSY,
        mantissa_bits=k,
        block_size=128,
        chunk_size=512,
        lanes=32,
        prob_bits=12,
    )
    assert bool(status.all())
    assert same_bits(out.cpu(), ref)


@requires_triton
def test_triton_decoder_reports_damage_without_faulting():
    x = torch.randn(700).to(torch.bfloat16)
    sym, raw = planes.split(x)
    st = ans.encode(sym, chunk_size=256, lanes=32, prob_bits=10)
    st.states[40] ^= 0x7777  # chunk 1
    dev = TRITON_DEVICE
    st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
    out = torch.empty(700, dtype=torch.bfloat16, device=dev)
    status = ans.decode_triton(
        st, raw.to(dev), None, out, fmt=planes.FMT_BF16, chunk_size=256, lanes=32, prob_bits=10
    )
    assert status.tolist() == [1, 0, 1]


@requires_triton
@pytest.mark.parametrize(
    ("n", "kind"), [(1500, "skewed"), (256, "uniform"), (1, "single"), (2000, "two"), (0, "two")]
)
def test_triton_encoder_writes_the_reference_stream(n, kind):
    """The device encoder gives the CPU encoder's stream bit for bit (ragged last chunk, one-symbol
    tables, empty input), and the Triton decoder reads it back."""
    sym = _symbols(n, kind, seed=n)
    want = ans.encode(sym, 256, 32, 10)
    got = ans.encode_triton(sym.to(TRITON_DEVICE), 256, 32, 10)
    for field in ("words", "states", "word_offsets", "table_lo", "table_len", "table_freq"):
        assert torch.equal(getattr(want, field), getattr(got, field).cpu()), field
    back, ok = ans.decode(ans.AnsStream(*(t.cpu() for t in got.__dict__.values())), n, 256, 32, 10)
    assert torch.equal(back, sym) and bool(ok.all())


@requires_triton
def test_triton_encoder_rejects_lanes_that_do_not_divide_the_chunk():
    with pytest.raises(ValueError, match="chunk_size"):
        ans.encode_triton(torch.zeros(10, dtype=torch.uint8, device=TRITON_DEVICE), 100, 32, 10)


def _lut_tables(prob_bits: int) -> torch.Tensor:
    """Frequency tables [C, 256] that stress the LUT kernel's slot tiles: symbols ending exactly
    on a tile boundary, zero-frequency gaps inside a table (also right after a boundary), one
    symbol, all 256 symbols, a rare symbol beside a dominant one, and random ones."""
    M = 1 << prob_bits
    rows = []
    t = torch.zeros(256, dtype=torch.int64)
    t[:] = M // 256  # all 256 symbols; every 512-slot tile boundary ends a symbol
    rows.append(t.clone())
    t.zero_()
    t[123] = M  # one symbol: its table is one entry, stored as 0
    rows.append(t.clone())
    t.zero_()
    b = min(ans._LUT_TILE, M // 2)  # the first tile boundary (or mid-table for one tile)
    t[5], t[8], t[9] = b, 1, M - b - 1  # symbol 5 ends on the boundary, then a gap of two
    rows.append(t.clone())
    t.zero_()
    t[10], t[200] = 1, M - 1  # a rare symbol, 189 absent ones, a dominant one
    rows.append(t.clone())
    g = torch.Generator().manual_seed(prob_bits)
    counts = torch.randint(0, 50, (3, 256), generator=g) * (torch.rand(3, 256, generator=g) < 0.4)
    rows.extend(ans.normalize_counts(counts, prob_bits))
    return torch.stack(rows)


@requires_triton
@pytest.mark.parametrize("prob_bits", [8, 10, 12])
def test_triton_lut_kernel_equals_build_luts(prob_bits):
    """The LUT kernel walks the slots in tiles; its tables equal the CPU reference bit for bit."""
    freq = _lut_tables(prob_bits)
    C, M = freq.shape[0], 1 << prob_bits
    lo, tlen, tfreq = ans._compact_tables(freq, prob_bits)
    stream = ans.AnsStream(
        words=torch.zeros(0, dtype=torch.int16),
        states=torch.zeros(0, dtype=torch.int32),
        word_offsets=torch.zeros(C + 1, dtype=torch.int32),
        table_lo=lo,
        table_len=tlen,
        table_freq=tfreq,
    )
    dev = TRITON_DEVICE
    lut = torch.full((C * M,), -1, dtype=torch.int32, device=dev)
    ans._lut_kernel[(C,)](
        lo.to(dev),
        stream.table_offsets().to(dev),
        tfreq.to(dev),
        lut,
        tfreq.numel(),
        0,
        PROB_BITS=prob_bits,
        TILE=min(M, ans._LUT_TILE),
        num_warps=4,
    )
    assert torch.equal(lut.cpu(), ans.build_luts(freq, prob_bits)[: C * M])


@requires_triton
def test_triton_decoder_first_chunk_decodes_only_the_tail():
    x = torch.randn(700).to(torch.bfloat16)
    sym, raw = planes.split(x)
    st = ans.encode(sym, chunk_size=256, lanes=32, prob_bits=10)
    dev = TRITON_DEVICE
    st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
    out = torch.zeros(700, dtype=torch.bfloat16, device=dev)
    kw = dict(fmt=planes.FMT_BF16, chunk_size=256, lanes=32, prob_bits=10)
    status = ans.decode_triton(st, raw.to(dev), None, out, first_chunk=1, **kw)
    assert status.tolist() == [0, 1, 1]
    assert same_bits(out[256:].cpu(), x[256:]) and not bool(out[:256].cpu().any())
    with pytest.raises(ValueError, match="first_chunk"):
        ans.decode_triton(st, raw.to(dev), None, out, first_chunk=4, **kw)
