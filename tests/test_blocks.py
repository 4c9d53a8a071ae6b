"""blocks.build: one grouping for estimated and measured blocks (and blocks never encoded);
they agree on everything but the compressed bytes."""

from __future__ import annotations

import pytest
import torch

from neuzip_offload import blocks, sizing
from neuzip_offload.config import CodecConfig
from neuzip_offload.encode import compress_weights
from neuzip_offload.model_analysis import analyze
from tests.helpers import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")


def _aligned(n: int) -> int:
    return (n + 255) // 256 * 256


def _row_pieces(name: str, t: torch.Tensor, limit: int) -> list:
    """A weight outside the layers cut into the fewest equal row pieces of <= limit bytes."""
    rows = t.shape[0]
    count = -(-t.numel() * t.element_size() // limit)
    step = -(-rows // count)
    out = []
    for i, a in enumerate(range(0, rows, step)):
        key = f"{name}[{i}]"
        out.append((key, [(key, (min(a + step, rows) - a) * t.shape[1])], 1))
    return out


def _expected(model, limit: int) -> list:
    """(block name, [(piece key, numel)], uses) read off the model's modules directly."""
    out = _row_pieces("model.embed_tokens.weight", model.model.embed_tokens.weight, limit)
    for i, layer in enumerate(model.model.layers):
        r = f"model.layers.{i}"
        members = [
            (f"{r}.{n}.weight", m.weight.numel())
            for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear)
        ]
        out.append((r, members, 1))
    return out + _row_pieces("lm_head.weight", model.lm_head.weight, limit)


def test_estimated_and_measured_blocks_agree_with_the_model():
    model = tiny_llama(layers=2)
    limit = 40_000  # the embedding and lm_head (1000 x 64 bf16, 128 kB) in 4 row pieces each
    weights, _ = analyze(model, limit, "layer")
    compressed = compress_weights(weights, CodecConfig(codec="zstd"), {}, None, False)
    estimated, none = blocks.build(weights, CPU, bits=4.0)
    measured, data = blocks.build(weights, CPU, compressed=compressed)
    assert none == []
    expected = _expected(model, limit)
    assert [s.name for s in estimated] == [s.name for s in measured] == [e[0] for e in expected]
    assert [d.keys for d in data] == [[k for k, _ in e[1]] for e in expected]
    for est, meas, (_, members, uses) in zip(estimated, measured, expected, strict=True):
        numel = sum(n for _, n in members)
        assert est.params == meas.params == numel
        assert est.decoded_bytes == meas.decoded_bytes == sum(_aligned(2 * n) for _, n in members)
        assert est.uses == meas.uses == uses
        # only the compressed sizes differ: estimated from 4 bits per weight, or measured
        assert est.compressed_bytes == sum(n // 2 + 1024 for _, n in members)
        assert meas.stored_bytes == sum(compressed[k].nbytes for k, _ in members)
        assert not est.on_disk and not meas.on_disk


def test_a_tied_weight_is_one_block_used_twice():
    model = tiny_gpt2()  # wte is lm_head's weight; Conv1D layers
    weights, roots = analyze(model, None, "layer")
    specs, _ = blocks.build(weights, CPU, bits=8.0)
    by_name = {s.name: s for s in specs}
    assert by_name["transformer.wte.weight"].uses == 2
    assert [s.name for s in specs if s.name in roots] == roots


def test_blocks_on_disk_carry_their_files():
    model = tiny_llama(layers=1)
    weights, _ = analyze(model, None, "layer")
    compressed = compress_weights(weights, CodecConfig(codec="zstd"), {}, None, False)
    first = weights[0].pieces[0][0]
    fake = {first: {"exponents": object()}}
    specs, data = blocks.build(weights, CPU, compressed=compressed, locations=fake)
    assert specs[0].on_disk and data[0].locations == [fake[first]]
    assert not any(s.on_disk for s in specs[1:]) and all(d.locations is None for d in data[1:])


def test_estimated_or_measured_not_both():
    weights, _ = analyze(tiny_llama(layers=1), None, "layer")
    with pytest.raises(ValueError, match="not both"):
        blocks.build(weights, CPU)
    with pytest.raises(ValueError, match="not both"):
        blocks.build(weights, CPU, bits=4.0, compressed={})


def test_blocks_never_encoded_carry_their_weights_and_no_setup_copy():
    model = tiny_llama(layers=2)
    weights, _ = analyze(model, None, "layer")
    cfg = CodecConfig(codec="ans")
    compressed = compress_weights(weights, cfg, {}, None, False)
    layer = [w for w in weights if w.root == "model.layers.1"]
    pieces = {w.key: w.param.detach() for w in layer}
    stand_ins = {k: sizing.unencoded(t, cfg, k) for k, t in pieces.items()}
    measured, _ = blocks.build(weights, CPU, compressed=compressed)
    mixed, data = blocks.build(weights, CPU, compressed={**compressed, **stand_ins}, decoded=pieces)
    for m, x, d in zip(measured, mixed, data, strict=True):
        if d.name != "model.layers.1":
            assert x == m and d.decoded is None
            continue
        assert [t.data_ptr() for t in d.decoded] == [pieces[k].data_ptr() for k in d.keys]
        assert all(ct.device.type == "meta" for ct in d.cts)
        # the same block but its compressed size, estimated; it arrives decoded: no setup copy
        assert (x.params, x.decoded_bytes, x.workspace_bytes, x.uses) == (
            m.params,
            m.decoded_bytes,
            m.workspace_bytes,
            m.uses,
        )
        assert x.compressed_bytes == pytest.approx(m.compressed_bytes, rel=0.01)
        assert m.setup_bytes > 0 and x.setup_bytes == 0


def test_a_block_is_encoded_whole_or_not_at_all():
    weights, _ = analyze(tiny_llama(layers=1), None, "layer")
    cfg = CodecConfig(codec="zstd")
    compressed = compress_weights(weights, cfg, {}, None, False)
    one = weights[1]  # inside model.layers.0, beside other weights that are encoded
    assert one.root == "model.layers.0"
    with pytest.raises(ValueError, match="encoded and pieces not"):
        blocks.build(weights, CPU, compressed=compressed, decoded={one.key: one.param})
