"""Mixture-of-experts checkpoints in the Hub's per-expert layout and in the fused one
(neuzip_offload/expert_layout.py), through conversion (conversion.py) and loading (loading.py,
encode.compress_from_files).

Both layouts of one model convert to the same compressed pieces, one per expert, each decoding
to exactly ``param[e]``; the loaders take those pieces as stored, or merge an uncompressed
checkpoint's per-expert tensors one expert at a time. The loading tests take the fused expert
weights as analysis makes them (model_analysis.find_weights).
"""

from __future__ import annotations

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload import conversion, expert_layout
from neuzip_offload.checkpoint import Checkpoint, CheckpointError
from neuzip_offload.codec import decompress
from neuzip_offload.config import CodecConfig
from neuzip_offload.encode import compress_from_files
from neuzip_offload.loading import entry_key, fill_model, place_weights, read_entry
from neuzip_offload.model_analysis import Weight, analyze, model_from_config, tie_meta_weights
from neuzip_offload.options import DispatchError, DispatchOptions
from neuzip_offload.storage import read_safetensors_header
from neuzip_offload.workers import WorkerProcesses
from tests.helpers import (
    same_bits,
    tiny_mixtral,
    tiny_qwen2_moe,
    write_fused_checkpoint,
    write_per_expert_checkpoint,
)

MODELS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe}
WRITERS = {"per_expert": write_per_expert_checkpoint, "fused": write_fused_checkpoint}
ZSTD = CodecConfig(codec="zstd")


def _experts(model) -> dict[str, torch.Tensor]:
    """The model's fused expert parameters by name."""
    return {n: p for n, p in model.named_parameters() if expert_layout.fused_param(n) is not None}


def _convert(src, dst, **kwargs) -> Checkpoint:
    return Checkpoint(nzo.convert(src, dst, codec="zstd", progress=False, **kwargs))


# ------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------


def test_names_of_the_two_layouts_round_trip():
    hub = "model.layers.3.block_sparse_moe.gate.weight"
    assert expert_layout.model_name(hub) == "model.layers.3.mlp.gate.weight"
    assert expert_layout.model_name("model.layers.3.mlp.gate.weight").endswith("mlp.gate.weight")
    assert hub in expert_layout.checkpoint_names("model.layers.3.mlp.gate.weight")
    # a base model's checkpoint for a model with a head, Hub names included
    assert "layers.3.block_sparse_moe.gate.weight" in expert_layout.checkpoint_names(
        "model.layers.3.mlp.gate.weight", "model"
    )
    assert expert_layout.checkpoint_names("lm_head.weight", "model")[:2] == [
        "lm_head.weight",
        "model.lm_head.weight",
    ]
    fused = "model.layers.3.mlp.experts.gate_up_proj"
    assert expert_layout.fused_param(fused) == ("model.layers.3.mlp.experts", "gate_up_proj")
    assert expert_layout.fused_param("model.layers.3.mlp.experts.0.w1.weight") is None
    assert expert_layout.piece_key(fused, 5) == fused + "[5]"

    shapes = {
        f"model.layers.3.block_sparse_moe.experts.{e}.{w}.weight": [128, 64]
        if w != "w2"
        else [64, 128]
        for e in range(4)
        for w in ("w1", "w2", "w3")
    }
    shapes["model.layers.3.block_sparse_moe.gate.weight"] = [4, 64]
    found = expert_layout.find_experts(shapes)
    assert set(found.pieces) == {fused, "model.layers.3.mlp.experts.down_proj"}
    p = found.pieces[fused][2]
    assert p.key == fused + "[2]" and p.shape == (256, 64) and p.fused_shape == (4, 256, 64)
    assert [s.name for s in p.sources] == [
        "model.layers.3.block_sparse_moe.experts.2.w1.weight",
        "model.layers.3.block_sparse_moe.experts.2.w3.weight",
    ]
    assert found.consumed == {n for n in shapes if ".experts." in n}
    assert found.resolve("layers.3.mlp.experts.gate_up_proj", "model") == fused
    assert found.expert_bytes(2)["model.layers.3.mlp.experts[0]"] == 3 * 128 * 64 * 2

    fused_shapes = {fused: [4, 256, 64], "model.layers.3.mlp.experts.down_proj": [4, 64, 128]}
    rows = expert_layout.find_experts(fused_shapes).pieces[fused]
    assert [(s.name, s.row) for s in rows[3].sources] == [(fused, 3)]
    assert rows[3].shape == (256, 64)


def test_a_missing_projection_is_named():
    shapes = {
        f"model.layers.0.mlp.experts.{e}.{w}.weight": [64, 64]
        for e in range(3)
        for w in ("gate_proj", "up_proj", "down_proj")
    }
    del shapes["model.layers.0.mlp.experts.1.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"experts\.1\.up_proj\.weight \(expert 1's up"):
        expert_layout.find_experts(shapes)


# ------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_both_layouts_convert_to_the_same_pieces(tmp_path, kind):
    """The per-expert layout (in 3 shards: an expert's gate and up in different files) and the
    fused one give the same entries and byte-identical planes; each piece is param[e]."""
    model = MODELS[kind]()
    write_per_expert_checkpoint(model, tmp_path / "per_expert", shards=3)
    write_fused_checkpoint(model, tmp_path / "fused")
    a = _convert(tmp_path / "per_expert", tmp_path / "a", workers=1)
    b = _convert(tmp_path / "fused", tmp_path / "b", workers=1)
    assert a.settings == b.settings  # the same piece limit: one expert's block, as dispatch's
    experts = _experts(model)
    assert experts
    for name, param in experts.items():
        ea, eb = a.entries[name], b.entries[name]
        assert ea.shape == eb.shape == tuple(param.shape) and ea.dtype == eb.dtype
        assert [(p, i, j) for p, _, i, j in ea.pieces] == [
            (f"{name}[{e}]", e, e + 1) for e in range(param.shape[0])
        ]
        assert [(p, i, j) for p, _, i, j in ea.pieces] == [(p, i, j) for p, _, i, j in eb.pieces]
        for (p, sa, e, _), (_, sb, _, _) in zip(ea.pieces, eb.pieces, strict=True):
            assert a.header(p, sa) == b.header(p, sb)
            ca, cb = a.read_compressed(p, sa), b.read_compressed(p, sb)
            for plane, data in ca.planes.items():
                assert torch.equal(data, cb.planes[plane]), (p, plane)
            assert same_bits(decompress(ca), param.data[e])
        assert same_bits(read_entry(a, ea), param.data)
    # everything else converts as it did; the router keeps its checkpoint's name
    others = {n for n in b.entries if n not in experts}
    if kind == "mixtral":
        hub = {n.replace(".mlp.gate.", ".block_sparse_moe.gate.") for n in others}
        assert set(a.entries) - set(experts) == hub
    else:
        assert set(a.entries) - set(experts) == others
    a.verify()
    # each piece is written once, by the shard of its first source; some read another shard
    shards = sorted((tmp_path / "per_expert").glob("*.safetensors"))
    headers = [read_safetensors_header(s)[0] for s in shards]
    works = conversion.plan_shards(shards, headers)
    keys = [p.key for w in works for p in w.pieces]
    assert sorted(keys) == sorted(p for n in experts for p, *_ in a.entries[n].pieces)
    assert any(w.reads(s) for w, s in zip(works, shards, strict=True))


def test_a_lone_shard_of_experts_split_among_processes_is_the_same_file(tmp_path):
    """Pieces of one fused parameter compressed by different processes: one entry, in order."""
    write_per_expert_checkpoint(tiny_qwen2_moe(layers=1), tmp_path / "hf")
    (shard,) = (tmp_path / "hf").glob("*.safetensors")
    outs = {k: tmp_path / k / "x.safetensors" for k in ("here", "divided")}
    for out in outs.values():
        out.parent.mkdir()
    args = (ZSTD, None, 1 << 20)
    here = conversion.convert_shard(shard, outs["here"], *args)
    with WorkerProcesses(2, local=False) as procs:
        divided = conversion.convert_shard(shard, outs["divided"], *args, procs)
    assert here == divided
    assert len(here["model.layers.0.mlp.experts.gate_up_proj"]["pieces"]) == 8
    assert outs["here"].read_bytes() == outs["divided"].read_bytes()


def test_conversion_names_the_missing_projection_and_writes_nothing(tmp_path):
    model = tiny_mixtral(layers=1)
    write_per_expert_checkpoint(model, tmp_path / "hf", shards=2)
    import json

    from safetensors.torch import load_file, save_file

    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    missing = "model.layers.0.block_sparse_moe.experts.5.w3.weight"
    file = tmp_path / "hf" / index["weight_map"].pop(missing)
    tensors = load_file(str(file))
    del tensors[missing]
    save_file(tensors, str(file))
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"lacks {missing} \(expert 5's up projection"):
        nzo.convert(tmp_path / "hf", tmp_path / "nz", progress=False)
    assert not (tmp_path / "nz").exists()


def test_save_compressed_stores_fused_experts_as_conversion_does(tmp_path):
    """An undispatched model's state dict: one piece per expert, as convert() writes them."""
    model = tiny_mixtral(layers=1)
    saved = Checkpoint(nzo.save_compressed(model, tmp_path / "s", codec="zstd", progress=False))
    write_fused_checkpoint(model, tmp_path / "hf")
    converted = _convert(tmp_path / "hf", tmp_path / "c")
    for name, param in _experts(model).items():
        e = saved.entries[name]
        assert [(i, j) for *_, i, j in e.pieces] == [(i, i + 1) for i in range(param.shape[0])]
        assert same_bits(read_entry(saved, e), param.data)
        p, shard, *_ = e.pieces[3]
        q, other, *_ = converted.entries[name].pieces[3]
        assert saved.header(p, shard) == converted.header(q, other)


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------


def _meta_weights(path) -> tuple[torch.nn.Module, list[Weight]]:
    """The model of ``path``'s config on meta and its compressed weights as analysis finds them
    (fused expert parameters: one piece an expert, ``(f"{key}[{e}]", e, e + 1)``)."""
    model = model_from_config(path, torch.bfloat16)
    tie_meta_weights(model)
    weights, _ = analyze(model, None)
    return model, weights


def _check_filled(model, weights, reference) -> None:
    """Every parameter but the compressed weights is in place, equal to the reference's."""
    skip = {n for w in weights for n in w.names}
    ref = dict(reference.named_parameters())
    for name, t in model.named_parameters():
        if name not in skip:
            assert same_bits(t.data, ref[name].data), name


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_dispatch_from_uncompressed_files_merges_experts(tmp_path, kind, layout):
    """encode.compress_from_files (dispatch(checkpoint=)): the fused pieces from either layout,
    one expert at a time; the router found under Mixtral's Hub name."""
    reference = MODELS[kind]()
    WRITERS[layout](reference, tmp_path / "hf", shards=2)
    model, weights = _meta_weights(tmp_path / "hf")
    compressed = compress_from_files(model, weights, tmp_path / "hf", ZSTD, None)
    ref = dict(reference.named_parameters())
    for w in weights:
        for key, a, b in w.pieces:
            assert same_bits(decompress(compressed[key]), w.piece_of(ref[w.key].data, a, b)), key
    _check_filled(model, weights, reference)


def test_dispatch_from_files_names_an_expert_parameter_it_lacks(tmp_path):
    reference = tiny_qwen2_moe(layers=1)
    state = {n: t.contiguous() for n, t in reference.state_dict().items() if "down_proj" not in n}
    from safetensors.torch import save_file

    (tmp_path / "hf").mkdir()
    reference.config.to_json_file(str(tmp_path / "hf" / "config.json"))
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    model, weights = _meta_weights(tmp_path / "hf")
    with pytest.raises(DispatchError, match=r"lacks .*experts\.down_proj"):
        compress_from_files(model, weights, tmp_path / "hf", ZSTD, None)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_load_takes_the_expert_pieces_as_stored(tmp_path, kind):
    """loading.place_weights: each expert's piece is the checkpoint's, planes left in its file
    (placeholders on meta, their locations); fill_model finds the router by its Hub name."""
    reference = MODELS[kind]()
    write_per_expert_checkpoint(reference, tmp_path / "hf", shards=3)
    ck = _convert(tmp_path / "hf", tmp_path / "nz", workers=1)
    model, weights = _meta_weights(ck.path)
    opts = DispatchOptions.build(10**8, device="cpu", codec="zstd", progress=False)
    prefix = model.base_model_prefix
    compressed, locations = place_weights(ck, weights, opts, None, prefix)
    fill_model(ck, model, weights)
    _check_filled(model, weights, reference)
    for w in (w for w in weights if w.kind.per_index):
        entry = ck.entries[entry_key(ck, w.key, prefix)]
        for (key, e, _), (piece, shard, *_) in zip(w.pieces, entry.pieces, strict=True):
            assert compressed[key].planes[next(iter(compressed[key].planes))].is_meta
            assert compressed[key].header == ck.header(piece, shard)
            assert locations[key] == ck.locations(piece, shard)
            stored = decompress(ck.read_compressed(piece, shard))
            assert same_bits(stored, reference.get_parameter(w.key).data[e])


# ------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_moe_checkpoints_load_and_dispatch_exactly(tmp_path, kind, layout):
    """nzo.load of a converted checkpoint and dispatch(checkpoint=) of the uncompressed one:
    logits bit-identical to the plain model's, batch 2."""
    reference = MODELS[kind]()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    want = _logits(reference, ids)
    WRITERS[layout](reference, tmp_path / "hf", shards=2)
    nzo.convert(tmp_path / "hf", tmp_path / "nz", codec="zstd", progress=False)
    loaded = nzo.load(tmp_path / "nz", max_gpu_mem=10**8, device="cpu", progress=False)
    assert same_bits(_logits(loaded, ids), want)
    meta = model_from_config(tmp_path / "hf", torch.bfloat16)
    opts = {"max_gpu_mem": 10**8, "device": "cpu", "codec": "zstd", "progress": False}
    filled = nzo.dispatch(meta, checkpoint=tmp_path / "hf", **opts)
    assert same_bits(_logits(filled, ids), want)
