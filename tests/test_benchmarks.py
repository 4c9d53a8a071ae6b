"""The benchmark scripts reach into the executor; these keep them runnable as the code moves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import neuzip_offload as nzo
from neuzip_offload import evaluate
from tests.helpers import model_bytes, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offload_benchmark_measures_a_dispatched_model():
    offload = _script("offload")
    model = tiny_llama()
    model = nzo.dispatch(model, max_gpu_mem=model_bytes(model) // 2, reserve=0, progress=False)
    prompt = torch.randint(0, 100, (1, 8))
    times = evaluate.decode_step_seconds(
        model, prompt, 2
    )  # records the order codec_seconds replays
    assert len(times) == 2 and all(t > 0 for t in times)
    assert offload.codec_seconds(model) > 0
