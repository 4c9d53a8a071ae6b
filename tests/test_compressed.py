"""The format: header, serialization and damaged data (one error type, naming the tensor)."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload.compressed import (
    PLANE_NAMES,
    CompressedTensor,
    DamagedDataError,
    Header,
    planes_crc,
    planes_crc_tensor,
)
from neuzip_offload.config import CodecConfig
from neuzip_offload.kernels import HAS_TRITON
from tests.helpers import same_bits


def _ct(codec: str = "ans", mode: str = "lossless", **kw) -> tuple[torch.Tensor, CompressedTensor]:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(70, 90, generator=g) * 0.05).to(torch.bfloat16)
    cfg = CodecConfig(codec=codec, mode=mode, chunk_size=512, block_size=64, **kw)
    return x, nzo.compress(x, config=cfg, name="layers.0.q.weight")


@pytest.mark.parametrize(
    ("codec", "mode"),
    [("ans", "lossless"), ("zstd", "lossless"), ("ans", "lossy"), ("zstd", "lossy")],
)
def test_state_round_trip(codec, mode):
    x, ct = _ct(codec, mode)
    header, planes = ct.state()
    again = CompressedTensor.from_state(header, {k: v.clone() for k, v in planes.items()}, "t")
    assert again.header == ct.header
    assert same_bits(nzo.decompress(again), nzo.decompress(ct))
    if mode == "lossless":
        assert same_bits(nzo.decompress(again), x)


def test_header_is_compact_versioned_json():
    _, ct = _ct()
    d = json.loads(ct.header.to_json())
    assert d["v"] == nzo.FORMAT_VERSION and d["t"] == "bf16" and d["s"] == [70, 90]
    assert ct.header_nbytes < 120
    assert Header.from_json(ct.header.to_json()) == ct.header


def test_keys_a_version_1_header_leaves_out_keep_their_meaning():
    """A header without "n", "w" or "pb" (64K chunks, 32 lanes, 12 bits: the codec's defaults
    when version 1 was written) reads so whatever the codec's defaults become; other values
    are written out."""
    old = '{"v":1,"t":"bf16","s":[4,8],"c":"ans","T":3,"e":10,"x":7}'
    h = Header.from_json(old)
    assert (h.chunk_size, h.lanes, h.prob_bits) == (1 << 16, 32, 12)
    assert h.to_json() == old  # written back the same
    x = torch.randn(300).to(torch.bfloat16)
    wide = nzo.compress(x, config=CodecConfig(codec="ans", lanes=64, chunk_size=256))
    d = json.loads(wide.header.to_json())
    assert (d["w"], d["n"]) == (64, 256)
    assert Header.from_json(wide.header.to_json()) == wide.header
    new = Header.from_json(old.replace('"c":"ans"', '"c":"ans","w":64'))
    assert new.lanes == 64 and '"w":64' in new.to_json()


def test_unknown_version_is_refused_with_a_message():
    _, ct = _ct()
    d = json.loads(ct.header.to_json())
    d["v"] = 99
    with pytest.raises(DamagedDataError, match="version 99 is not supported"):
        CompressedTensor.from_state(json.dumps(d), ct.planes, "w")


@pytest.mark.parametrize("plane", ["exp", "meta", "raw", "scales"])
def test_a_flipped_byte_fails_the_checksum_naming_the_tensor(plane):
    _, ct = _ct(mode="lossy" if plane == "scales" else "lossless")
    header, planes = ct.state()
    planes = {k: v.clone() for k, v in planes.items()}
    planes[plane][planes[plane].numel() // 2] ^= 0x10
    with pytest.raises(DamagedDataError, match="layers.0.q.weight.*checksum"):
        CompressedTensor.from_state(header, planes, "layers.0.q.weight")


@pytest.mark.parametrize("plane", ["exp", "meta", "raw"])
def test_a_truncated_plane_is_refused(plane):
    _, ct = _ct()
    header, planes = ct.state()
    planes = dict(planes, **{plane: planes[plane][:-3]})
    with pytest.raises(DamagedDataError, match=f"'{plane}' has .* expected"):
        CompressedTensor.from_state(header, planes, "w")
    with pytest.raises(DamagedDataError, match="mis-sized"):
        CompressedTensor.from_state(header, planes, "w", verify=False)


def test_missing_plane_and_garbage_header_are_refused():
    _, ct = _ct()
    header, planes = ct.state()
    with pytest.raises(DamagedDataError, match="planes"):
        CompressedTensor.from_state(header, {k: v for k, v in planes.items() if k != "raw"}, "w")
    with pytest.raises(DamagedDataError, match="not a valid neuzip header"):
        CompressedTensor.from_state("{not json", planes, "w")
    d = json.loads(header)
    d["s"] = [70, -90]
    with pytest.raises(DamagedDataError, match="negative"):
        CompressedTensor.from_state(json.dumps(d), planes, "w")


@pytest.mark.parametrize("codec", ["ans", "zstd"])
def test_damage_past_the_checksum_is_still_caught_by_the_decoder(codec):
    """Even when checksums are skipped, decoding raises instead of returning garbage silently."""
    _, ct = _ct(codec)
    header, planes = ct.state()
    planes = {k: v.clone() for k, v in planes.items()}
    planes["exp"][10:40] = 0x5A
    damaged = CompressedTensor.from_state(header, planes, "w", verify=False)
    with pytest.raises(DamagedDataError, match="^w: "):
        nzo.decompress(damaged, verify=False)


def test_inconsistent_index_is_reported_before_decoding():
    _, ct = _ct("ans")
    header, planes = ct.state()
    meta = planes["meta"].clone()
    C = ct.header.n_chunks
    W = ct.header.lanes  # the states come first: W per chunk
    woff = meta[4 * C * W : 4 * C * W + 4 * (C + 1)].view(torch.int32)
    woff[1] = 10**8  # a word offset past the end of the stream
    damaged = CompressedTensor.from_state(header, dict(planes, meta=meta), "w", verify=False)
    with pytest.raises(DamagedDataError, match="word offsets"):
        nzo.decompress(damaged, verify=False)


# ------------------------------------------------------------------------------------------
# checksums of in-memory tensors: decompress() checks them
# ------------------------------------------------------------------------------------------


def _flipped(ct: CompressedTensor, plane: str) -> CompressedTensor:
    planes = {k: v.clone() for k, v in ct.planes.items()}
    planes[plane][planes[plane].numel() // 2] ^= 0x10
    return ct.with_planes(planes)


@pytest.mark.parametrize("codec", ["ans", "zstd"])
@pytest.mark.parametrize("plane", ["exp", "meta", "raw", "scales"])
def test_decompress_refuses_a_flipped_byte_in_any_plane(codec, plane):
    """No reading from disk involved: the planes of a tensor in memory are damaged."""
    _, ct = _ct(codec, mode="lossy" if plane == "scales" else "lossless")
    damaged = _flipped(ct, plane)
    with pytest.raises(DamagedDataError, match=r"^layers\.0\.q\.weight: .*fails its checksum"):
        nzo.decompress(damaged)
    with pytest.raises(DamagedDataError, match=r"^layers\.0\.q\.weight: .*fails its checksum"):
        nzo.decompress_many([ct, damaged])


def test_verify_false_skips_the_checksum():
    """A flipped raw byte decodes without error when unchecked: one weight silently changes.
    This is what the checksum in decompress() is for."""
    x, ct = _ct()
    damaged = _flipped(ct, "raw")
    unchecked = [nzo.decompress(damaged, verify=False)]
    unchecked += nzo.decompress_many([damaged], verify=False)
    for y in unchecked:
        assert int((y.view(torch.int16) != x.view(torch.int16)).sum()) == 1
    assert same_bits(nzo.decompress(ct), x)


@pytest.mark.parametrize(
    ("codec", "mode"), [("ans", "lossless"), ("zstd", "lossless"), ("ans", "lossy")]
)
def test_planes_crc_is_zlib_chained_over_the_planes(codec, mode):
    """The header CRC is zlib.crc32 chained over exp, meta, raw, scales (existing checkpoints stay
    valid); the device kernel (here in the Triton interpreter) computes the same value."""
    _, ct = _ct(codec, mode)
    want = 0
    for k in PLANE_NAMES:
        if k in ct.planes:
            want = zlib.crc32(ct.planes[k].numpy().tobytes(), want)
    assert ct.header.crc == want
    assert planes_crc(ct.planes) == want
    assert int(planes_crc_tensor(ct.planes)) == want
    if HAS_TRITON:
        assert int(planes_crc_tensor(ct.planes, use_triton=True)) == want
    assert planes_crc(_flipped(ct, "meta").planes) != want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["lossless", "lossy"])
def test_cuda_tensors_are_checksummed_on_the_device(mode):
    x = (torch.randn(300, 500) * 0.05).to(torch.bfloat16).cuda()
    ct = nzo.compress(x, mode=mode, name="w")
    assert planes_crc(ct.cpu().planes) == ct.header.crc  # the device CRC is zlib's
    nzo.decompress(ct)
    with pytest.raises(DamagedDataError, match="^w: .*fails its checksum"):
        nzo.decompress(_flipped(ct, "raw"))
