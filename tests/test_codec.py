"""compress()/decompress(): lossless bit-exactness, lossy bounds, shapes, both coders, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuzip_offload as nzo
from neuzip_offload.codec import decode_into
from neuzip_offload.config import CodecConfig
from tests.helpers import (
    TRITON_DEVICE,
    all_bf16,
    all_fp16,
    fp32_specials_and_random,
    requires_triton,
    same_bits,
)

CODECS = ["ans", "zstd"]


@pytest.mark.parametrize("codec", CODECS)
def test_every_bf16_pattern_round_trips(codec):
    x = all_bf16().view(256, 256)
    ct = nzo.compress(x, codec=codec)
    assert ct.shape == x.shape and ct.dtype == torch.bfloat16 and ct.codec == codec
    assert same_bits(nzo.decompress(ct), x)


@pytest.mark.parametrize("codec", CODECS)
def test_every_fp16_pattern_round_trips(codec):
    x = all_fp16()
    assert same_bits(nzo.decompress(nzo.compress(x, codec=codec)), x)


@pytest.mark.parametrize("codec", CODECS)
def test_fp32_random_and_special_patterns_round_trip(codec):
    x = fp32_specials_and_random(150_000)
    assert same_bits(nzo.decompress(nzo.compress(x, codec=codec)), x)


def test_the_two_coders_agree():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(300, 200, generator=g) * 0.02).to(torch.bfloat16)
    a = nzo.compress(x, codec="ans")
    z = nzo.compress(x, codec="zstd")
    assert torch.equal(a.planes["raw"], z.planes["raw"])  # same planes, different coder
    assert same_bits(nzo.decompress(a), nzo.decompress(z))


def test_default_codec_follows_the_device():
    ct = nzo.compress(torch.randn(64, 64).to(torch.bfloat16))
    assert ct.codec == "zstd"  # a CPU tensor is decoded on the CPU
    assert CodecConfig().for_device("cuda").codec == "ans"


_dtypes = st.sampled_from([torch.bfloat16, torch.float16, torch.float32])
_shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=_dtypes,
    shape=_shapes,
    codec=st.sampled_from(CODECS),
    seed=st.integers(0, 2**31),
    transpose=st.booleans(),
)
def test_any_shape_and_bit_pattern_round_trips(dtype, shape, codec, seed, transpose):
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    ints = {torch.float32: torch.int32}.get(dtype, torch.int16)
    bits = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(ints)
    x = bits.view(dtype).reshape(shape)
    if transpose and x.dim() >= 2:
        x = x.transpose(0, 1)  # non-contiguous input
    cfg = CodecConfig(codec=codec, chunk_size=256 if codec == "ans" else 512)
    ct = nzo.compress(x, config=cfg)
    y = nzo.decompress(ct)
    assert y.shape == x.shape and y.is_contiguous()
    assert same_bits(y, x.contiguous())


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(0, 7),
    block_log=st.integers(0, 10),
    n=st.integers(1, 3000),
    seed=st.integers(0, 2**31),
    codec=st.sampled_from(CODECS),
)
def test_lossy_bound_holds_for_any_k_and_block(k, block_log, n, seed, codec):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))).to(torch.bfloat16)
    ct = nzo.compress(x, "lossy", codec=codec, mantissa_bits=k, block_size=1 << block_log)
    y = nzo.decompress(ct).float()
    xf = x.float()
    ok = xf.abs() >= 2 * torch.finfo(torch.bfloat16).tiny
    rel = ((y - xf).abs() / xf.abs())[ok]
    assert rel.numel() == 0 or float(rel.max()) <= 2.0 ** -(k + 1) + 2.0**-8


def test_lossy_k7_without_normalization_equals_lossless():
    x = all_bf16()
    x = x[torch.isfinite(x)]
    ct = nzo.compress(x, "lossy", mantissa_bits=7, normalize=False)
    assert same_bits(nzo.decompress(ct), x)


@pytest.mark.parametrize("k", [0, 1, 3, 5, 7])
def test_lossy_bits_per_weight_shrink_with_k(k):
    x = (torch.randn(256, 512) * 0.02).to(torch.bfloat16)
    ct = nzo.compress(x, "lossy", codec="ans", mantissa_bits=k)
    # sign + k mantissa bits raw, ~2.7 bits of coded exponent, 7 bits per 512-weight block
    assert 1 + k + 2 < ct.bits_per_weight < 1 + k + 3.2


def test_decompress_into_a_callers_buffer():
    x = torch.randn(40, 30).to(torch.bfloat16)
    ct = nzo.compress(x)
    slot = torch.empty(5000, dtype=torch.bfloat16)
    view = slot[100 : 100 + x.numel()]
    y = nzo.decompress(ct, out=view)
    assert y.data_ptr() == view.data_ptr() and same_bits(y, x)


def test_decompress_many_matches_one_by_one():
    xs = [
        torch.randn(s).to(d)
        for s, d in [
            ((30, 20), torch.bfloat16),
            ((0,), torch.float32),
            ((7,), torch.float16),
            ((5, 5), torch.float32),
        ]
    ]
    for codec in CODECS:
        cts = nzo.compress_many(xs, CodecConfig(codec=codec, chunk_size=256))
        for x, y in zip(xs, nzo.decompress_many(cts), strict=True):
            assert same_bits(y, x)


def test_sizes_and_moving_never_decode():
    x = (torch.randn(512, 512) * 0.02).to(torch.bfloat16)
    ct = nzo.compress(x, codec="ans")
    assert ct.nbytes == sum(p.numel() for p in ct.planes.values()) + ct.header_nbytes
    assert ct.bits_per_weight == pytest.approx(8 * ct.nbytes / x.numel())
    assert 10.0 < ct.bits_per_weight < 11.2
    moved = ct.to("cpu", non_blocking=True)
    assert moved.nbytes == ct.nbytes and moved.header is ct.header
    pinned = ct.pin_memory()  # without CUDA nothing can be pinned: the same bytes come back
    assert same_bits(nzo.decompress(pinned), x)
    assert nzo.compress(torch.empty(0)).bits_per_weight == math.inf


@requires_triton
@pytest.mark.parametrize("mode", ["lossless", "lossy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_path_decodes_what_the_cpu_path_decodes(mode, dtype):
    x = (torch.randn(33, 40) * 0.1).to(dtype)
    cfg = CodecConfig(codec="ans", mode=mode, chunk_size=256, prob_bits=10, block_size=64)
    ct = nzo.compress(x, config=cfg).to(TRITON_DEVICE)
    out = torch.empty(x.numel(), dtype=dtype, device=TRITON_DEVICE)
    status = decode_into(ct, out, use_triton=True)
    assert bool(status.all())
    assert same_bits(out.cpu(), nzo.decompress(ct.cpu()).reshape(-1))


@requires_triton
@pytest.mark.parametrize("mode", ["lossless", "lossy"])
def test_device_compression_equals_host_compression(mode, monkeypatch):
    """Compressing on the GPU (Triton split and rANS encoder; here in the interpreter) gives the
    host's bytes: the same planes, header and checksum."""
    from neuzip_offload import codec

    x = (torch.randn(33, 40) * 0.1).to(torch.bfloat16)
    cfg = CodecConfig(codec="ans", mode=mode, chunk_size=256, prob_bits=10, block_size=64)
    host = nzo.compress(x, config=cfg)
    monkeypatch.setattr(codec, "_use_triton", lambda t: True)
    device = nzo.compress(x.to(TRITON_DEVICE), config=cfg).cpu()
    assert device.header == host.header
    for k, plane in host.planes.items():
        assert torch.equal(plane, device.planes[k]), k


@requires_triton
def test_device_compression_of_several_tensors_is_one_encoder_launch(monkeypatch):
    """compress_many's device tensors of one setting are rANS-encoded together, in one kernel
    launch, and each gives the host's bytes (planes, header, checksum)."""
    from neuzip_offload import codec
    from neuzip_offload.kernels import ans_encode_triton, aot

    calls = []
    encode = ans_encode_triton.encode_block_triton

    def counted(planes, *args):
        rec = aot.LaunchRecorder()
        with rec.recording():
            streams = encode(planes, *args)
        calls.append((len(planes), rec.launches))
        return streams

    xs = [(torch.randn(n) * 0.1).to(torch.bfloat16) for n in (700, 1, 256, 0)]
    cfg = CodecConfig(codec="ans", chunk_size=256, prob_bits=10)
    host = nzo.compress_many(xs, cfg)
    monkeypatch.setattr(codec, "_use_triton", lambda t: True)
    monkeypatch.setattr(ans_encode_triton, "encode_block_triton", counted)
    device = nzo.compress_many([x.to(TRITON_DEVICE) for x in xs], cfg)
    assert calls == [(4, 1)]
    for h, d in zip(host, device, strict=True):
        d = d.cpu()
        assert d.header == h.header
        for k, plane in h.planes.items():
            assert torch.equal(plane, d.planes[k]), k


# ------------------------------------------------------------------------------------------
# bad input: clear errors that name the argument
# ------------------------------------------------------------------------------------------


def test_unsupported_dtype_is_refused():
    with pytest.raises(TypeError, match=r"w.*int32.*bfloat16"):
        nzo.compress(torch.zeros(4, dtype=torch.int32), name="w")
    with pytest.raises(TypeError, match="torch.Tensor"):
        nzo.compress([1.0, 2.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mantissa_bits": 8}, "mantissa_bits must be an int in 0..7, got 8"),
        ({"mantissa_bits": -1}, "mantissa_bits"),
        ({"mantissa_bits": 2.0}, "mantissa_bits"),
        ({"block_size": 3}, "block_size must be a positive power of two, got 3"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"block_size": 1 << 25}, "block_size must be at most 2\\*\\*24, got 33554432"),
        ({"codec": "gzip"}, "codec must be one of"),
        ({"chunk_size": 100}, "chunk_size"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nzo.compress(torch.zeros(8), "lossy", **kwargs)


@pytest.mark.parametrize("lanes", [256, 1024, 48, 0])
def test_lanes_past_one_warps_registers_are_refused(lanes):
    from neuzip_offload.config import CodecConfig

    with pytest.raises(ValueError, match=f"lanes must be a power of two up to 128 .*warp.*{lanes}"):
        CodecConfig(codec="ans", lanes=lanes)
    assert CodecConfig(codec="ans", lanes=128).lanes == 128


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        nzo.compress(torch.zeros(8), "lossy-ish")


def test_lossy_refuses_non_finite_values():
    with pytest.raises(ValueError, match="inf or NaN"):
        nzo.compress(torch.tensor([1.0, float("nan")]), "lossy")


def test_out_must_fit():
    ct = nzo.compress(torch.zeros(10, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be a torch.bfloat16 tensor of 10"):
        nzo.decompress(ct, out=torch.empty(9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be a torch.bfloat16"):
        nzo.decompress(ct, out=torch.empty(10, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        nzo.decompress(ct, out=torch.empty(10, 2, dtype=torch.bfloat16)[:, 0])


# ------------------------------------------------------------------------------------------
# checksums: decompress() and decompress_many() verify, the scheduler's decode_into does not
# ------------------------------------------------------------------------------------------


def _damage_raw(ct):
    planes = {k: v.clone() for k, v in ct.planes.items()}
    planes["raw"][7] ^= 0x01
    return ct.with_planes(planes)


def test_decompress_many_names_the_tensor_that_fails_its_checksum():
    xs = [(torch.randn(20, 30) * 0.1).to(torch.bfloat16) for _ in range(3)]
    cts = nzo.compress_many(xs, CodecConfig(codec="ans", chunk_size=256), ["a", "b", "c"])
    cts += nzo.compress_many(xs[:1], CodecConfig(codec="zstd"), ["z"])
    for bad in range(4):
        damaged = list(cts)
        damaged[bad] = _damage_raw(cts[bad])
        name = cts[bad].name
        with pytest.raises(nzo.DamagedDataError, match=f"^{name}: the data fails its checksum"):
            nzo.decompress_many(damaged)
        outs = nzo.decompress_many(damaged, verify=False)  # unchecked: decodes, one bit off
        assert not same_bits(outs[bad], xs[bad % 3])
    for out, x in zip(nzo.decompress_many(cts), xs + xs[:1], strict=True):
        assert same_bits(out, x)


@pytest.mark.parametrize("codec", CODECS)
def test_decode_into_does_not_checksum(codec):
    """The hot path has its own read-time checks: a damaged raw byte is not its business."""
    x = (torch.randn(20, 30) * 0.1).to(torch.bfloat16)
    ct = _damage_raw(nzo.compress(x, codec=codec, chunk_size=256))
    out = torch.empty(x.numel(), dtype=x.dtype)
    assert decode_into(ct, out) is None
    assert int((out.view(torch.int16) != x.view(-1).view(torch.int16)).sum()) == 1
