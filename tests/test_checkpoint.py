"""Compressed checkpoints: conversion, load with a disk tier, integrity, resume, memory, plans."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload import bundled
from neuzip_offload.checkpoint import INDEX_NAME, PROGRESS_NAME, Checkpoint, CheckpointError
from neuzip_offload.cli import main as cli
from neuzip_offload.scheduler.plan import DISK
from tests.helpers import same_bits, tiny_gpt2, tiny_llama

REPO = Path(__file__).resolve().parents[1]


def _hf_dir(tmp_path: Path, model, name: str = "hf") -> Path:
    path = tmp_path / name
    model.save_pretrained(path, max_shard_size="100KB")
    return path


def _reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


@pytest.mark.parametrize("factory", [lambda: tiny_llama(tied=True), tiny_gpt2])
def test_round_trip_with_blocks_on_disk_is_bit_identical(tmp_path, factory):
    src = _hf_dir(tmp_path, factory())
    ref_model = _reference(src)
    ids = torch.randint(1, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(ids).logits
    out = nzo.convert(src, tmp_path / "nz", progress=False)
    assert len(list(out.glob("neuzip-*.safetensors"))) == len(list(src.glob("*.safetensors")))
    assert (out / "config.json").exists() and not (out / PROGRESS_NAME).exists()
    from safetensors.torch import load_file  # any safetensors reader opens the shards

    for shard in out.glob("neuzip-*.safetensors"):
        assert all(
            t.dtype in (torch.uint8, torch.bfloat16, torch.float32)
            for t in load_file(shard).values()
        )
    size = sum(p.numel() * p.element_size() for p in ref_model.parameters())
    compressed = Checkpoint(out).compressed_bytes()
    model = nzo.load(
        out,
        max_gpu_mem=int(0.5 * size),
        max_cpu_mem=compressed // 2,
        reserve=0,
        prefetch=1,
        progress=False,
    )
    assert DISK in model.neuzip.plan.tiers
    with torch.no_grad():
        for _ in range(3):
            assert same_bits(model(ids).logits, ref)
    stats = model.neuzip.stats
    assert stats["per_forward"]["read_bytes"] > 0
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **kw), ref_model.generate(ids[:1], **kw))


def test_dispatch_from_a_checkpoint_matches_load(tmp_path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    src = _hf_dir(tmp_path, tiny_llama(tied=True))
    ids = torch.randint(0, 1000, (1, 7))
    loaded = nzo.load(
        nzo.convert(src, tmp_path / "nz", progress=False), max_gpu_mem=10**8, progress=False
    )
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    model = nzo.dispatch(meta.eval(), max_gpu_mem=10**8, checkpoint=src, progress=False)
    with torch.no_grad():
        assert same_bits(model(ids).logits, loaded(ids).logits)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    offloaded = nzo.dispatch(
        meta.eval(), max_gpu_mem=10**8, checkpoint=src, offload_dir=tmp_path / "off", progress=False
    )
    with torch.no_grad():
        assert same_bits(offloaded(ids).logits, loaded(ids).logits)


def test_save_compressed_writes_what_load_reads(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    nzo.dispatch(model, max_gpu_mem=10**8, progress=False)
    nzo.save_compressed(model, tmp_path / "saved", progress=False)
    again = nzo.load(tmp_path / "saved", max_gpu_mem=10**8, progress=False)
    with torch.no_grad():
        # the dispatched model's buffers are its own (bf16 inv_freq here), so compare weights
        assert torch.allclose(again(ids).logits.float(), ref.float(), atol=0.1)
    nzo.undispatch(again)
    nzo.undispatch(model)
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.dim() == 2:
            assert same_bits(again.state_dict()[k], v), k


def test_state_dicts_and_tied_aliases(tmp_path):
    a = torch.randn(40, 30).to(torch.bfloat16)
    state = {"emb": a, "head": a, "norm": torch.ones(30), "step": torch.tensor(7)}
    nzo.save_compressed(state, tmp_path / "sd", progress=False)
    ck = Checkpoint(tmp_path / "sd")
    assert ck.aliases == {"head": "emb"}
    assert ck.entries["emb"].kind == "compressed" and ck.entries["step"].kind == "plain"
    assert torch.equal(ck.read_plain("step"), torch.tensor(7))


# ------------------------------------------------------------------------------------------
# integrity
# ------------------------------------------------------------------------------------------


def _converted(tmp_path: Path) -> Path:
    return nzo.convert(_hf_dir(tmp_path, tiny_llama()), tmp_path / "nz", progress=False)


def test_a_flipped_byte_names_the_tensor(tmp_path):
    out = _converted(tmp_path)
    ck = Checkpoint(out)
    entry = ck.entries["model.layers.1.mlp.up_proj.weight"]
    piece, shard = entry.pieces[0][:2]
    loc = ck.locations(piece, shard)["raw"]
    with open(loc.path, "r+b") as f:
        f.seek(loc.offset + 17)
        b = f.read(1)
        f.seek(loc.offset + 17)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(nzo.DamagedDataError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        nzo.load(out, max_gpu_mem=10**8, progress=False)
    # without the up-front check, the block is checked as it is read from disk
    with pytest.raises(nzo.DamagedDataError, match="up_proj.*checksum"):
        nzo.load(out, max_gpu_mem=10**8, verify=False, progress=False)


def test_a_truncated_or_missing_shard_names_itself(tmp_path):
    out = _converted(tmp_path)
    shard = sorted(out.glob("neuzip-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(nzo.DamagedDataError, match=f"{shard.name}.*truncated"):
        nzo.load(out, max_gpu_mem=10**8, progress=False)
    shard.unlink()
    with pytest.raises(nzo.DamagedDataError, match=f"{shard.name}.*missing"):
        nzo.load(out, max_gpu_mem=10**8, progress=False)


def test_an_unknown_version_is_refused(tmp_path):
    out = _converted(tmp_path)
    index = json.loads((out / INDEX_NAME).read_text())
    index["version"] = 99
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        nzo.load(out, max_gpu_mem=10**8, progress=False)
    with pytest.raises(CheckpointError, match="not a neuzip checkpoint"):
        Checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------
# the 70B plan from a config, and the command line
# ------------------------------------------------------------------------------------------


def test_the_70b_plan_from_a_config_touches_no_weights_and_allocates_nothing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(bundled.LLAMA3_70B_CONFIG))
    # Every torch op of the planning is watched: the largest tensor any op writes off the meta
    # device counts the work done on real memory (a planner that touched weights makes GBs).
    # torch.empty is left out: init_empty_weights lets nn.Linear make its weight uninitialized
    # on the CPU (pages never touched) before it moves it to meta.
    code = textwrap.dedent(f"""
        import psutil, torch, transformers, accelerate, neuzip_offload as nzo
        from torch.utils._python_dispatch import TorchDispatchMode
        from neuzip_offload import model_from_config
        from pathlib import Path
        class Largest(TorchDispatchMode):
            numel = 0
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {{}}))
                aten = torch.ops.aten
                if func in (aten.empty.memory_format, aten.empty_strided.default):
                    return out
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        Largest.numel = max(Largest.numel, t.numel())
                return out
        proc = psutil.Process(); base = proc.memory_info().rss
        with Largest():
            model = model_from_config(Path({str(tmp_path)!r}), torch.bfloat16)
            plans = [nzo.plan_model(model, "8GB", max_cpu_mem="64GB", **kw) for kw in
                     ({{}}, {{"mode": "lossy", "mantissa_bits": 3}},
                      {{"mode": "lossy", "mantissa_bits": 1}})]
        on_meta = all(p.device.type == "meta" for p in model.parameters())
        print(int(on_meta), Largest.numel, proc.memory_info().rss - base,
              plans[0].stored_bytes, plans[0].disk_bytes, plans[1].disk_bytes)
    """)
    on_meta, largest, growth, stored, disk0, disk1 = map(
        float, subprocess.check_output([sys.executable, "-c", code], cwd=REPO).split()[-6:]
    )
    assert on_meta == 1  # the 70.6B weights were never materialized
    assert largest < 2**20  # no op made a real tensor of even a million elements
    assert growth < 200 * 2**20
    assert 90e9 < stored < 100e9  # ≈ 10.7 bits per weight for 70.6B weights
    assert disk0 > 0 and disk1 == 0  # lossless spills to disk at 64 GB; lossy k=3 does not


def test_cli_compress_inspect_plan(tmp_path, capsys):
    src = _hf_dir(tmp_path, tiny_llama())
    out = tmp_path / "nz"
    assert cli(["compress", str(src), str(out)]) == 0
    assert cli(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in text and "checksums ok" in text
    assert (
        cli(["plan", str(out), "--max-gpu-mem", "1MB", "--max-cpu-mem", "1GB", "--device", "cpu"])
        == 0
    )
    text = capsys.readouterr().out
    assert "as stored" in text and "lower bound" in text
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(bundled.LLAMA3_70B_CONFIG))
    assert (
        cli(
            [
                "plan",
                str(tmp_path / "cfg" / "config.json"),
                "--max-gpu-mem",
                "8GB",
                "--max-cpu-mem",
                "64GB",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for label in ("lossless", "lossy k=3", "lossy k=1"):
        assert f"=== {label} ===" in text
    assert "from disk" in text and "s/token" in text
    assert math.isfinite(float(text.split("planned in ")[1].split()[0]))


def test_bench_helpers_export_models_transformers_cannot(tmp_path):
    from neuzip_offload import bundled

    model = tiny_llama(tied=True)
    bundled.export_safetensors(model, tmp_path / "exp", max_shard_bytes=100_000)
    assert len(list((tmp_path / "exp").glob("*.safetensors"))) > 1
    assert os.path.exists(tmp_path / "exp" / "config.json")
    index = json.loads((tmp_path / "exp" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as the embedding
    again = _reference(tmp_path / "exp")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    for k, v in model.state_dict().items():
        assert same_bits(again.state_dict()[k], v), k


def test_load_with_offload_dir_reads_its_disk_tier_from_the_copy(tmp_path):
    """load(offload_dir=) copies the shards the disk tier reads to a (faster) folder and reads
    them from there: outputs are exact, and damaging the original does not matter."""
    model = tiny_llama(layers=4)
    src = _hf_dir(tmp_path, model)
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _reference(src)(ids).logits  # built as load() builds it, from the config
    out = nzo.convert(src, tmp_path / "nz", progress=False)
    fast = tmp_path / "fast"
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = nzo.load(
        out,
        max_gpu_mem=int(0.5 * size),
        max_cpu_mem=Checkpoint(out).compressed_bytes() // 2,
        reserve=0,
        prefetch=1,
        offload_dir=fast,
        progress=False,
    )
    assert DISK in loaded.neuzip.plan.tiers
    for shard in out.glob("*.safetensors"):  # the originals are no longer read
        shard.write_bytes(b"\0" * shard.stat().st_size)
    assert any(fast.glob("*.safetensors"))
    with torch.no_grad():
        assert same_bits(loaded(ids).logits, ref)
