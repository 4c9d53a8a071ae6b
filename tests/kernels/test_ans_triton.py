"""kernels/ans_triton.py: the rANS Triton decode kernel (its slot tables included) against ans.py.
(The device encoder's tests are in test_ans_encode_triton.py.)"""

from __future__ import annotations

import pytest
import torch

from neuzip_offload.kernels import ans, ans_triton, aot, planes
from tests.helpers import TRITON_DEVICE, requires_triton, same_bits

pytestmark = requires_triton


@pytest.mark.parametrize(
    ("dtype", "lanes"),
    [(torch.bfloat16, 32), (torch.float16, 32), (torch.float32, 32), (torch.bfloat16, 64),
     (torch.float32, 64), (torch.bfloat16, 16), (torch.bfloat16, 128)],
)  # fmt: skip
def test_triton_decoder_matches_reference_lossless(dtype, lanes):
    """Every lane count the decoder has a path for: one ballot (<= 32), two (64: two states per
    thread), a prefix sum (more)."""
    x = (torch.randn(1500) * torch.logspace(-3, 2, 1500)).to(dtype)
    x[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    sym, raw = planes.split(x)
    st = ans.encode(sym, chunk_size=256, lanes=lanes, prob_bits=10)
    dev = TRITON_DEVICE
    st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
    out = torch.empty(x.numel(), dtype=dtype, device=dev)
    kw = dict(fmt=planes.FMT_OF[dtype], chunk_size=256, lanes=lanes, prob_bits=10)
    status = ans_triton.decode_triton(st, raw.to(dev), None, out, **kw)
    assert bool(status.all())
    assert same_bits(out.cpu(), x)


@pytest.mark.parametrize(
    ("k", "normalize", "dtype", "lanes"),
    [
        (3, True, torch.bfloat16, 32),
        (0, True, torch.float32, 32),
        (7, False, torch.float16, 32),
        (3, True, torch.bfloat16, 64),
    ],
)
def test_triton_decoder_matches_reference_lossy(k, normalize, dtype, lanes):
    x = (torch.randn(1200) * 0.05).to(dtype)
    sym, field, scales = planes.lossy_split(x, k, 128, normalize)
    ref = planes.lossy_merge(sym, field, scales, k, 128, dtype)
    st = ans.encode(sym, chunk_size=512, lanes=lanes, prob_bits=12)
    dev = TRITON_DEVICE
    st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
    out = torch.empty(x.numel(), dtype=dtype, device=dev)
    status = ans_triton.decode_triton(
        st,
        field.to(dev),
        None if scales is None else scales.to(dev),
        out,
        fmt=planes.FMT_LOSSY,
        mantissa_bits=k,
        block_size=128,
        chunk_size=512,
        lanes=lanes,
        prob_bits=12,
    )
    assert bool(status.all())
    assert same_bits(out.cpu(), ref)


@pytest.mark.parametrize("lanes", [16, 32, 64, 128])
@pytest.mark.parametrize("rest", [(7, 3), (8, 0), (8, 5), (12, 7)])
def test_the_full_trips_and_the_masked_rest_meet_exactly(lanes, rest):
    """The decoder runs a chunk's full trips unmasked (every lane of the 4 steps it decodes and
    of the 4 it loads raw bits for is in range) and the rest masked. A whole chunk of 16 steps
    (3 full trips, 1 masked), then a last chunk of ``rest`` = (whole steps, symbols more):
    just below, on and past the first full trip's bound (8 whole steps); every lane path
    (one ballot, two, a prefix sum) and every raw layout (bf16, fp16's 2-bit field, fp32's
    three bytes, lossy with scales) decodes exactly."""
    chunk = 16 * lanes
    n = chunk + rest[0] * lanes + rest[1]
    dev = TRITON_DEVICE
    kw = dict(chunk_size=chunk, lanes=lanes, prob_bits=10)
    x32 = torch.randn(n) * torch.logspace(-2, 1, n)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = x32.to(dtype)
        sym, raw = planes.split(x)
        st = ans.encode(sym, **kw)
        st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
        out = torch.empty(n, dtype=dtype, device=dev)
        fmt = planes.FMT_OF[dtype]
        status = ans_triton.decode_triton(st, raw.to(dev), None, out, fmt=fmt, **kw)
        assert status.tolist() == [1, 1], dtype
        assert same_bits(out.cpu(), x), dtype
    x = x32.to(torch.bfloat16)
    sym, field, scales = planes.lossy_split(x, 3, 64, True)
    st = ans.encode(sym, **kw)
    st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
    out = torch.empty(n, dtype=torch.bfloat16, device=dev)
    status = ans_triton.decode_triton(
        st, field.to(dev), scales.to(dev), out, fmt=planes.FMT_LOSSY, mantissa_bits=3,
        block_size=64, **kw,
    )  # fmt: skip
    assert status.tolist() == [1, 1]
    assert same_bits(out.cpu(), planes.lossy_merge(sym, field, scales, 3, 64, torch.bfloat16))


def test_triton_decoder_reports_damage_without_faulting():
    x = torch.randn(700).to(torch.bfloat16)
    sym, raw = planes.split(x)
    st = ans.encode(sym, chunk_size=256, lanes=32, prob_bits=10)
    st.states[40] ^= 0x7777  # chunk 1
    dev = TRITON_DEVICE
    st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
    out = torch.empty(700, dtype=torch.bfloat16, device=dev)
    status = ans_triton.decode_triton(
        st, raw.to(dev), None, out, fmt=planes.FMT_BF16, chunk_size=256, lanes=32, prob_bits=10
    )
    assert status.tolist() == [1, 0, 1]


def test_a_damaged_table_stays_inside_its_program_and_its_chunk_is_reported():
    """Frequencies summing far past M (a damaged table the executor's device path decodes
    without validating): the slot fill stays inside its program's M slots (the workspace past
    the last program's region is untouched), the other chunks' tables and floats come out
    right, and the chunk is reported damaged."""
    x = (torch.randn(768) * 0.05).to(torch.bfloat16)
    sym, raw = planes.split(x)
    st = ans.encode(sym, chunk_size=256, lanes=32, prob_bits=10)
    freq = ans.expand_tables(st, 10)
    freq[2][freq[2] > 0] = 1023  # the last chunk's entries now sum to ~10 x M
    lo, tlen, tfreq = ans.compact_tables(freq, 10)
    dev = TRITON_DEVICE
    bad = ans.AnsStream(st.words, st.states, st.word_offsets, lo, tlen, tfreq)
    bad = ans.AnsStream(*(t.to(dev) for t in bad.__dict__.values()))
    out = torch.empty(768, dtype=torch.bfloat16, device=dev)
    need = ans.table_words(3, 10)
    ws = torch.full((need + 8192,), -1, dtype=torch.int32, device=dev)  # a guard zone after
    kw = dict(fmt=planes.FMT_BF16, chunk_size=256, lanes=32, prob_bits=10, workspace=ws)
    status = ans_triton.decode_triton(bad, raw.to(dev), None, out, **kw)
    assert status.tolist() == [1, 1, 0]
    assert same_bits(out[:512].cpu(), x[:512])
    assert bool((ws[need:].cpu() == -1).all())
    good, written = ans.decode_tables(st, 10)
    got = ws.cpu().view(torch.uint8)
    for c in (0, 1):  # the other programs' tables are whole
        at = ans.TABLE_GUARD_BYTES + c * 2048  # past the guard: program c's 2 KB
        part = slice(at, at + 2048)
        assert torch.equal(got[part][written[part]], good[part][written[part]])


def _lut_tables(prob_bits: int) -> torch.Tensor:
    """Frequency tables [C, 256] that stress the table build's slot tiles: symbols ending exactly
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
    b = min(ans_triton._LUT_TILE, M // 2)  # the first tile boundary (or mid-table for one tile)
    t[5], t[8], t[9] = b, 1, M - b - 1  # symbol 5 ends on the boundary, then a gap of two
    rows.append(t.clone())
    t.zero_()
    t[10], t[200] = 1, M - 1  # a rare symbol, 189 absent ones, a dominant one
    rows.append(t.clone())
    g = torch.Generator().manual_seed(prob_bits)
    counts = torch.randint(0, 50, (3, 256), generator=g) * (torch.rand(3, 256, generator=g) < 0.4)
    rows.extend(ans.normalize_counts(counts, prob_bits))
    return torch.stack(rows)


@pytest.mark.parametrize("prob_bits", [8, 10, 12])
def test_triton_decoder_tables_equal_the_reference(prob_bits):
    """The decode kernel's prologue walks the slots in tiles; the tables it leaves in the
    workspace equal the CPU reference (ans.decode_tables) bit for bit, and that reference
    says what ans.build_luts says: each slot's symbol, f and slot - cum. (The chunks have no
    words: their decode reads none and ends damaged, which the tables do not depend on.)"""
    freq = _lut_tables(prob_bits)
    C, M = freq.shape[0], 1 << prob_bits
    lo, tlen, tfreq = ans.compact_tables(freq, prob_bits)
    dev = TRITON_DEVICE
    stream = ans.AnsStream(
        words=torch.zeros(0, dtype=torch.int16, device=dev),
        states=torch.full((C * 32,), 65536, dtype=torch.int32, device=dev),
        word_offsets=torch.zeros(C + 1, dtype=torch.int32, device=dev),
        table_lo=lo.to(dev),
        table_len=tlen.to(dev),
        table_freq=tfreq.to(dev),
    )
    out = torch.empty(C * 256, dtype=torch.bfloat16, device=dev)  # C chunks of 256
    raw = torch.zeros(C * 256, dtype=torch.uint8, device=dev)
    ws = torch.full((ans.table_words(C, prob_bits),), -1, dtype=torch.int32, device=dev)
    ans_triton.decode_triton(
        stream,
        raw,
        None,
        out,
        fmt=planes.FMT_BF16,
        chunk_size=256,
        lanes=32,
        prob_bits=prob_bits,
        workspace=ws,
    )
    expect, written = ans.decode_tables(stream, prob_bits)
    got = ws.cpu().view(torch.uint8)
    assert torch.equal(got[written], expect[written])
    assert bool((got[~written] == 0xFF).all())  # nothing else: the workspace's -1 stays
    # the reference against build_luts: entry symbol | (f - 1) << 8 | (slot - cum) << 20
    assert not bool(written[: ans.TABLE_GUARD_BYTES].any())  # the guard stays as it was
    per = expect[ans.TABLE_GUARD_BYTES :].view(C, M + 1024)
    sym = per[:, :M].to(torch.int64)
    fc = per[:, M:].contiguous().view(torch.int32).to(torch.int64)  # [C, 256], by entry
    e = fc.gather(1, sym - lo.to(torch.int64)[:, None])
    f1, cum = (e & 0x1FFF) - 1, e >> 13
    slots = torch.arange(M)[None, :]
    lut = ans.build_luts(freq, prob_bits)[: C * M].view(C, M).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(sym, lut & 0xFF)
    assert torch.equal(f1, (lut >> 8) & 0xFFF)
    assert torch.equal(slots - cum, lut >> 20)


def test_triton_decoder_first_chunk_decodes_only_the_tail():
    x = torch.randn(700).to(torch.bfloat16)
    sym, raw = planes.split(x)
    st = ans.encode(sym, chunk_size=256, lanes=32, prob_bits=10)
    dev = TRITON_DEVICE
    st = ans.AnsStream(*(t.to(dev) for t in st.__dict__.values()))
    out = torch.zeros(700, dtype=torch.bfloat16, device=dev)
    kw = dict(fmt=planes.FMT_BF16, chunk_size=256, lanes=32, prob_bits=10)
    status = ans_triton.decode_triton(st, raw.to(dev), None, out, first_chunk=1, **kw)
    assert status.tolist() == [0, 1, 1]
    assert same_bits(out[256:].cpu(), x[256:]) and not bool(out[:256].cpu().any())
    with pytest.raises(ValueError, match="first_chunk"):
        ans_triton.decode_triton(st, raw.to(dev), None, out, first_chunk=4, **kw)


def _packed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors copied into one buffer at 64-byte-aligned offsets, as a packed block holds
    its planes: views of one storage."""
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors]
    buf = torch.zeros(sum(sizes) + 64, dtype=torch.uint8, device=TRITON_DEVICE)
    views, pos = [], 64  # not at the buffer's start: offsets are relative to the storage
    for t, size in zip(tensors, sizes, strict=True):
        nbytes = t.numel() * t.element_size()
        view = buf[pos : pos + nbytes].view(t.dtype)
        view.copy_(t.reshape(-1).to(TRITON_DEVICE))
        views.append(view)
        pos += size
    return views


def _block_jobs(xs, cfg, *, packed, k, scales=False, damage_in=None):
    """(jobs, references) for a block of tensors ``xs``: lossless, or lossy at k with block 128.
    ``packed``: planes of each kind in one buffer, outputs in one slot buffer."""
    chunk, lanes, pb = cfg
    fields, refs = [], []
    for i, x in enumerate(xs):
        if k is None:
            sym, raw = planes.split(x)
            sc, ref = None, x
        else:
            sym, raw, sc = planes.lossy_split(x, k, 128, scales)
            ref = planes.lossy_merge(sym, raw, sc, k, 128, x.dtype)
        st = ans.encode(sym, chunk, lanes, pb)
        if i == damage_in:
            st.states[lanes] ^= 0x7777  # its chunk 1
        fields.append([*st.__dict__.values(), raw, sc])
        refs.append(ref)
    outs = [torch.empty(x.numel(), dtype=x.dtype, device=TRITON_DEVICE) for x in xs]
    if packed:  # one buffer per plane kind (stands for the one packed buffer), one slot
        kinds = [_packed([f[j] for f in fields]) for j in range(7)]
        kinds.append(_packed([f[7] for f in fields]) if scales else [None] * len(xs))
        fields = [[kind[i] for kind in kinds] for i in range(len(xs))]
        outs = _packed(outs)
    else:
        fields = [[None if t is None else t.to(TRITON_DEVICE) for t in f] for f in fields]
    jobs = [
        ans_triton.DecodeJob(ans.AnsStream(*f[:6]), f[6], f[7], out)
        for f, out in zip(fields, outs, strict=True)
    ]
    return jobs, refs


def _count_launches(monkeypatch) -> list[tuple[int, int]]:
    """(tensors, Triton kernel launches) of each group decode_block_triton launches."""
    calls: list[tuple[int, int]] = []
    launch = ans_triton._launch

    def counted(jobs, *args, **kw):
        rec = aot.LaunchRecorder()
        with rec.recording():
            status = launch(jobs, *args, **kw)
        calls.append((len(jobs), rec.launches))
        return status

    monkeypatch.setattr(ans_triton, "_launch", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_packed_block_decodes_in_one_launch(dtype, monkeypatch):
    """A block's tensors (ragged last chunks, a one-chunk tensor, a one-symbol table, one
    element) decode in one kernel launch into their places in one slot, bit for bit;
    the damage counter stays 0."""
    xs = [
        (torch.randn(700) * torch.logspace(-3, 2, 700)).to(dtype),
        torch.randn(256).to(dtype),
        torch.full((300,), 1.5, dtype=dtype),
        torch.tensor([-0.0], dtype=dtype),
    ]
    xs[0][:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    jobs, refs = _block_jobs(xs, (256, 32, 10), packed=True, k=None)
    calls = _count_launches(monkeypatch)
    damage = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    fmt = planes.FMT_OF[dtype]
    status = ans_triton.decode_block_triton(
        jobs, fmt=fmt, chunk_size=256, lanes=32, prob_bits=10, damage=damage
    )
    assert calls == [(4, 1)]
    assert status.tolist() == [1] * 7 and int(damage) == 0
    for job, ref in zip(jobs, refs, strict=True):
        assert same_bits(job.out.cpu(), ref)


def test_a_lossy_block_with_scales_decodes_in_one_launch(monkeypatch):
    xs = [(torch.randn(n) * 0.05).to(torch.bfloat16) for n in (600, 130)]
    jobs, refs = _block_jobs(xs, (512, 32, 12), packed=True, scales=True, k=3)
    calls = _count_launches(monkeypatch)
    status = ans_triton.decode_block_triton(
        jobs,
        fmt=planes.FMT_LOSSY,
        mantissa_bits=3,
        block_size=128,
        chunk_size=512,
        lanes=32,
        prob_bits=12,
    )
    assert calls == [(2, 1)] and status.tolist() == [1, 1, 1]
    for job, ref in zip(jobs, refs, strict=True):
        assert same_bits(job.out.cpu(), ref)


def test_block_damage_is_counted_on_the_device_and_other_storages_take_more_launches(
    monkeypatch,
):
    """A damaged chunk in the second tensor: its status is 0 and the counter reads 1. Planes
    not packed into one buffer still decode exactly, one launch per tensor."""
    xs = [torch.randn(n).to(torch.bfloat16) for n in (300, 600)]
    kw = dict(fmt=planes.FMT_BF16, chunk_size=256, lanes=32, prob_bits=10)
    calls = _count_launches(monkeypatch)
    jobs, _ = _block_jobs(xs, (256, 32, 10), packed=True, k=None, damage_in=1)
    damage = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    status = ans_triton.decode_block_triton(jobs, damage=damage, **kw)
    assert calls == [(2, 1)]
    assert status.tolist() == [1, 1, 1, 0, 1] and int(damage) == 1
    jobs, refs = _block_jobs(xs, (256, 32, 10), packed=False, k=None)
    status = ans_triton.decode_block_triton(jobs, damage=damage, **kw)
    assert calls == [(2, 1), (1, 1), (1, 1)] and status.tolist() == [1] * 5 and int(damage) == 1
    for job, ref in zip(jobs, refs, strict=True):
        assert same_bits(job.out.cpu(), ref)
