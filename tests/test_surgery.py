"""surgery.attach / Attachment.detach: module swaps, moved tensors and hooks, exactly undone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuzip_offload import blocks
from neuzip_offload.config import CodecConfig
from neuzip_offload.encode import compress_weights
from neuzip_offload.model_analysis import analyze
from neuzip_offload.modules import CompressedModule
from neuzip_offload.scheduler.executor import Executor
from neuzip_offload.scheduler.plan import PlanOptions, make_plan
from neuzip_offload.surgery import attach
from tests.helpers import same_bits, tiny_llama

CPU = torch.device("cpu")


def _hook_counts(model: nn.Module) -> dict[str, int]:
    return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}


def _attached(model: nn.Module):
    weights, roots = analyze(model, 40_000, "layer")  # embedding and lm_head in pieces
    compressed = compress_weights(weights, CodecConfig(codec="zstd"), {}, None, False)
    specs, data = blocks.build(weights, CPU, compressed=compressed)
    plan = make_plan(specs, PlanOptions(device_bytes=10**8, host_bytes=10**9, copies=False))
    executor = Executor(plan, data, CPU)
    return weights, executor, attach(model, weights, roots, executor)


def test_attach_swaps_every_compressed_module_and_detach_puts_back_the_same_objects():
    model = tiny_llama(layers=2)
    modules = dict(model.named_modules())
    params = {n: (p, p.clone()) for n, p in model.named_parameters()}
    hooks = _hook_counts(model)
    weights, executor, done = _attached(model)

    # while attached: every Linear/Embedding is a compressed twin; the originals hold no weight
    linear_like = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding))]
    now = dict(model.named_modules())
    assert all(isinstance(now[n], CompressedModule) for n in linear_like)
    assert all(modules[n].weight is None for n in linear_like)
    assert {n for n, _ in model.named_parameters()} == {
        n for n in params if not n.endswith(("proj.weight", "tokens.weight", "head.weight"))
    }
    assert sum(_hook_counts(model).values()) > sum(hooks.values())
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)  # runs through the executor

    decoded = {w.key: params[w.key][1] for w in weights}
    executor.close()
    done.detach(decoded)

    # after: the same module objects at the same names, no hook left, the same values
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert _hook_counts(model) == hooks
    assert list(n for n, _ in model.named_parameters()) == list(params)
    for n, p in model.named_parameters():
        assert isinstance(p, nn.Parameter) and same_bits(p.data, params[n][1]), n
        if not n.endswith("weight") or "norm" in n:  # never swapped: the very same tensor
            assert p is params[n][0], n


def test_tied_weights_come_back_tied():
    model = tiny_llama(layers=1, tied=True)
    _, executor, done = _attached(model)
    executor.close()
    done.detach({w.key: torch.ones(w.shape, dtype=w.dtype) for w in done.weights})
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _small_dispatched():
    import neuzip_offload as nzo
    from tests.helpers import model_bytes, tiny_llama

    plain = tiny_llama()
    return nzo.dispatch(
        tiny_llama(), max_gpu_mem=int(0.6 * model_bytes(plain)), reserve=0, progress=False
    )


def test_copies_and_conversions_are_refused_before_anything_changes():
    import copy

    model = _small_dispatched()
    ids = torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.raises(RuntimeError, match="cannot be copied.*undispatch"):
        copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="cannot be copied"):
        copy.deepcopy(model.model.layers[0])
    for convert in (
        lambda: model.to(torch.float32),
        lambda: model.half(),
        lambda: model.float(),
        lambda: model.model.layers[1].to(torch.float16),
    ):
        with pytest.raises(RuntimeError, match=r"stays in torch.bfloat16.*before dispatch"):
            convert()
    assert model.to("cpu") is model  # no change asked: allowed
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # nothing was half converted


def test_undispatch_lifts_the_guards():
    import copy

    import neuzip_offload as nzo

    model = _small_dispatched()
    nzo.undispatch(model)
    assert copy.deepcopy(model).to(torch.float32).lm_head.weight.dtype == torch.float32


def test_torch_compile_runs_around_the_compressed_modules():
    model = _small_dispatched()
    ids = torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager")
        assert torch.allclose(compiled(ids).logits.float(), ref.float(), atol=1e-2)
        assert torch.allclose(compiled(ids).logits.float(), ref.float(), atol=1e-2)
