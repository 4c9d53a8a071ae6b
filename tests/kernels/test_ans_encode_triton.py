"""kernels/ans_encode_triton.py: the device rANS encoder (one launch per block, tables counted and
normalized on the device) against ans.py."""

from __future__ import annotations

import pytest
import torch

from neuzip_offload.kernels import HAS_TRITON, ans, ans_encode_triton, ans_triton, aot, planes
from tests.helpers import TRITON_DEVICE, requires_triton, same_bits
from tests.kernels.inputs import symbols

pytestmark = requires_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _normalize_rows(counts_ptr, out_ptr, PROB_BITS: tl.constexpr):
        """Row r of counts [R, 256] normalized by the encoder's device function."""
        r = tl.program_id(0)
        idx = tl.arange(0, 256)
        c = tl.load(counts_ptr + r * 256 + idx)
        freq = ans_encode_triton._normalize(c, tl.sum(c, 0), PROB_BITS)
        tl.store(out_ptr + r * 256 + idx, freq)


FIELDS = ("words", "states", "word_offsets", "table_lo", "table_len", "table_freq")


def _block(pb: int) -> list[torch.Tensor]:
    """Planes of different sizes and histograms: ragged last chunks (not a multiple of 32
    either), exactly one chunk, one symbol only, one element, empty, random, skewed."""
    return [
        symbols(1500, "skewed", seed=1),
        symbols(256, "uniform", seed=2),
        torch.full((300,), 7, dtype=torch.uint8),
        symbols(1, "skewed", seed=3),
        torch.zeros(0, dtype=torch.uint8),
        symbols(700, "two", seed=pb),
        symbols(517, "uniform", seed=5).view(11, 47),  # any shape
    ]


@pytest.mark.parametrize(("prob_bits", "lanes"), [(10, 32), (12, 32), (12, 64), (12, 128)])
def test_one_launch_writes_the_reference_streams(prob_bits, lanes):
    """Every tensor's stream equals ans.encode_many's bit for bit (dtypes included), from one
    kernel launch; the CPU decoder reads each back. 64 and 128 lanes: two and four states per
    thread."""
    planes_ = _block(prob_bits)
    want = ans.encode_many(planes_, 256, lanes, prob_bits)
    rec = aot.LaunchRecorder()
    with rec.recording():
        got = ans_encode_triton.encode_block_triton(
            [p.to(TRITON_DEVICE) for p in planes_], 256, lanes, prob_bits
        )
    assert rec.launches == 1
    for i, (g, w, sym) in enumerate(zip(got, want, planes_, strict=True)):
        for field in FIELDS:
            a, b = getattr(w, field), getattr(g, field).cpu()
            assert a.dtype == b.dtype and torch.equal(a, b), (i, field)
        st = ans.AnsStream(*(getattr(g, f).cpu() for f in FIELDS))
        assert ans.validate(st, sym.numel(), 256, lanes, prob_bits) is None
        back, ok = ans.decode(st, sym.numel(), 256, lanes, prob_bits)
        assert torch.equal(back, sym.reshape(-1)) and bool(ok.all()), i


@pytest.mark.parametrize(
    ("n", "kind"), [(1500, "skewed"), (256, "uniform"), (1, "single"), (2000, "two"), (0, "two")]
)
def test_triton_encoder_writes_the_reference_stream(n, kind):
    """The device encoder gives the CPU encoder's stream bit for bit (ragged last chunk, one-symbol
    tables, empty input), and the CPU decoder reads it back."""
    sym = symbols(n, kind, seed=n)
    want = ans.encode(sym, 256, 32, 10)
    got = ans_encode_triton.encode_triton(sym.to(TRITON_DEVICE), 256, 32, 10)
    for field in FIELDS:
        assert torch.equal(getattr(want, field), getattr(got, field).cpu()), field
    back, ok = ans.decode(ans.AnsStream(*(t.cpu() for t in got.__dict__.values())), n, 256, 32, 10)
    assert torch.equal(back, sym) and bool(ok.all())


def test_one_tensor_and_the_triton_decoder_round_trip():
    """encode_triton (one plane) gives ans.encode's stream; the fused decoder reads it back into
    the floats, bit for bit."""
    x = (torch.randn(1000) * torch.logspace(-3, 2, 1000)).to(torch.bfloat16)
    sym, raw = planes.split(x)
    st = ans_encode_triton.encode_triton(sym.to(TRITON_DEVICE), 256, 32, 10)
    want = ans.encode(sym, 256, 32, 10)
    for field in FIELDS:
        assert torch.equal(getattr(want, field), getattr(st, field).cpu()), field
    out = torch.empty(1000, dtype=torch.bfloat16, device=TRITON_DEVICE)
    status = ans_triton.decode_triton(
        st,
        raw.to(TRITON_DEVICE),
        None,
        out,
        fmt=planes.FMT_BF16,
        chunk_size=256,
        lanes=32,
        prob_bits=10,
    )
    assert bool(status.all()) and same_bits(out.cpu(), x)


def _count_rows(prob_bits: int) -> torch.Tensor:
    """Count rows [R, 256] that reach every branch of normalize_counts: random (sparse and
    dense, several totals), equal remainders at the deficit's boundary (ties), lifting that
    overshoots (negative deficits, taken in several rounds from equal maxima), one symbol,
    all 256 symbols, and totals near 2**24 (the float estimate's bound)."""
    g = torch.Generator().manual_seed(prob_bits)
    rows = []
    for density, scale in ((0.05, 50), (0.3, 1000), (1.0, 7), (0.6, 65536)):
        keep = torch.rand(10, 256, generator=g) < density
        rows.append(torch.randint(1, scale + 1, (10, 256), generator=g) * keep)
    t = torch.zeros(12, 256, dtype=torch.int64)
    t[0, :3] = 1  # ties: three equal remainders, one +1
    t[1, 10:17] = 3
    t[2, 5:40:5] = 11
    t[3, 200:] = 9
    t[4, :200], t[4, 250] = 1, 100_000  # 200 lifted symbols: a negative deficit
    t[5, :100], t[5, 100], t[5, 101] = 1, 5000, 5000  # equal maxima to take from
    t[6, :255], t[6, 255] = 1, 3  # every symbol lifted or nearly
    t[7, 42] = 12345  # one symbol
    t[8, :] = 1  # all symbols, once each
    t[9, :], t[9, 17] = 65535, 2**24 - 255 * 65535  # a total of 2**24
    t[10, 3], t[10, 4] = 2**24 - 1, 1
    t[11, ::3] = torch.arange(1, 87) * 1111
    rows.append(t)
    return torch.cat(rows).to(torch.int32)


@pytest.mark.parametrize("prob_bits", [8, 10, 12])
def test_device_normalization_equals_normalize_counts(prob_bits):
    counts = _count_rows(prob_bits)
    assert int(counts.sum(dim=1).max()) <= 2**24
    out = torch.empty_like(counts, device=TRITON_DEVICE)
    _normalize_rows[(counts.shape[0],)](counts.to(TRITON_DEVICE), out, PROB_BITS=prob_bits)
    want = ans.normalize_counts(counts, prob_bits)
    assert torch.equal(out.cpu().to(torch.int64), want)


def test_normalize_counts_breaks_ties_by_symbol():
    """Equal fractional parts: the lower symbols get the remainder; equal maxima: the lowest
    symbol is taken from."""
    c = torch.zeros(2, 256, dtype=torch.int64)
    c[0, [9, 3, 5]] = 1  # 256 / 3 = 85 r 1 each: one +1, to symbol 3
    c[1, :10], c[1, 100], c[1, 101] = 1, 1000, 1000  # lifting overshoots by 8: 127 + 127 + 10
    f = ans.normalize_counts(c, 8)
    assert f[0, [3, 5, 9]].tolist() == [86, 85, 85]
    assert f[1, [0, 100, 101]].tolist() == [1, 119, 127]


def test_a_block_spans_many_tensors_in_one_launch():
    """More tensors than a decode launch takes (its tensor table's 32), each one chunk: one
    launch, every stream exact."""
    planes_ = [symbols(40 + 3 * i, "skewed", seed=i) for i in range(33)]
    want = ans.encode_many(planes_, 256, 32, 10)
    rec = aot.LaunchRecorder()
    with rec.recording():
        got = ans_encode_triton.encode_block_triton(
            [p.to(TRITON_DEVICE) for p in planes_], 256, 32, 10
        )
    assert rec.launches == 1
    for g, w in zip(got, want, strict=True):
        for field in FIELDS:
            assert torch.equal(getattr(w, field), getattr(g, field).cpu()), field


def test_bad_input_is_refused():
    """Lanes that do not divide the chunk, a plane that is not uint8; no planes: no streams."""
    sym = torch.zeros(10, dtype=torch.uint8, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="chunk_size"):
        ans_encode_triton.encode_triton(sym, 100, 32, 10)
    with pytest.raises(ValueError, match="uint8"):
        ans_encode_triton.encode_block_triton([sym, sym.to(torch.int16)], 256, 32, 10)
    assert ans_encode_triton.encode_block_triton([], 256, 32, 10) == []
