"""Mixture-of-experts models: experts are blocks of their own, fetched only when routed.

Oracles: the plain transformers model (its eager experts loop) for logits and greedy tokens; the
router's own choices (recomputed here from the layer inputs) for the experts a forward may
fetch; the original fused tensors for state_dict and undispatch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload.modules import CompressedExperts
from tests.helpers import tiny_mixtral, tiny_qwen2_moe


def _init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # matrices as a trained model's scale; norms stay at 1
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(torch.bfloat16).eval()


def tiny_moe(kind: str, seed: int = 0, layers: int = 3) -> torch.nn.Module:
    """tests/helpers' tiny Mixtral (top-2 of 8) or Qwen2-MoE (top-4 of 8, a shared expert)."""
    build = tiny_mixtral if kind == "mixtral" else tiny_qwen2_moe
    return build(seed, layers=layers)


def _bf16_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _dispatch(model, share: float = 0.4, **kw):
    """Dispatched within ``share`` of its bf16 size; the reserve for activations and KV cache
    sized for these short sequences (the estimate for 1024 tokens would take most of it)."""
    kw = {"reserve": "32KiB", **kw}
    return nzo.dispatch(
        model,
        max_gpu_mem=int(share * _bf16_bytes(model)),
        device="cpu",
        codec="zstd",
        progress=False,
        **kw,
    )


@pytest.mark.parametrize(
    "kind, speculate, impl, share, pools",
    [
        ("mixtral", True, "grouped_mm", 0.4, True),
        ("mixtral", False, "eager", 0.4, True),
        ("qwen2_moe", True, "eager", 0.4, False),  # no pool: the shared working slots only
        ("qwen2_moe", False, "grouped_mm", 0.4, False),
        ("qwen2_moe", True, "grouped_mm", 0.8, True),
    ],
)
def test_lossless_moe_is_bit_identical(kind, speculate, impl, share, pools):
    """The model's own experts implementation (grouped_mm is transformers' default on this
    machine, eager the loop) is what the dispatched model reproduces, bit for bit: with and
    without an expert cache (a pool per layer), with and without speculation."""
    plain = tiny_moe(kind)
    plain.config._experts_implementation = impl
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = plain(ids).logits
        ref_tokens = plain.generate(ids[:1], max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stays uncompressed" warning any more
        model = _dispatch(copy.deepcopy(plain), share=share, speculate=speculate)
    assert (model.neuzip.plan.expert_slots > 0) == pools
    tiers = {
        b.name: t for b, t in zip(model.neuzip.plan.blocks, model.neuzip.plan.tiers, strict=True)
    }
    assert any(t != "device" for n, t in tiers.items() if "experts[" in n)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # batch > 1
        tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False)  # batch 1
    assert torch.equal(tokens, ref_tokens)
    experts = model.neuzip.stats["experts"]
    assert experts["uses"] > 0 and experts["fetches"] > 0
    assert (experts["guessed"] > 0) == speculate


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_experts_are_blocks_and_almost_nothing_stays_plain(kind):
    plain = tiny_moe(kind)
    total = sum(p.numel() for p in plain.parameters())
    model = _dispatch(copy.deepcopy(plain))
    # speculation is on where fetches overlap compute (CUDA), off on the CPU by default
    assert not model.neuzip.plan.options.speculate
    left = sum(p.numel() for p in model.parameters())  # what stays an nn.Parameter
    assert left / total < 0.10
    names = [b.name for b in model.neuzip.plan.blocks]
    for layer in range(3):
        for e in range(8):
            assert f"model.layers.{layer}.mlp.experts[{e}]" in names
    blk = next(b for b in model.neuzip.plan.blocks if b.name == "model.layers.1.mlp.experts[3]")
    top_k = plain.config.num_experts_per_tok
    assert blk.routed == "model.layers.1.mlp.experts" and blk.uses == top_k / 8
    # attention (and Qwen's shared expert) stay in the layer's blocks, not in the experts'
    ex, blocks = model.neuzip.executor, model.neuzip.plan.blocks
    others = ["model.layers.1.self_attn.q_proj.weight"]
    if kind == "qwen2_moe":
        others.append("model.layers.1.mlp.shared_expert.up_proj.weight")
    for key in others:
        assert blocks[ex.block_index(key)].routed is None
    assert isinstance(model.model.layers[1].mlp.experts, CompressedExperts)
    assert model.neuzip.num_parameters() == total


def test_state_dict_and_undispatch_give_back_the_fused_tensors():
    plain = tiny_moe("mixtral")
    ref = {k: v.clone() for k, v in plain.state_dict().items()}
    model = _dispatch(copy.deepcopy(plain))
    sd = model.state_dict()
    for name in ("gate_up_proj", "down_proj"):
        key = f"model.layers.2.mlp.experts.{name}"
        assert torch.equal(sd[key], ref[key])
    assert set(sd) == set(ref)
    with pytest.raises(RuntimeError, match="cannot replace .*gate_up_proj"):
        model.load_state_dict({k: v for k, v in ref.items() if "experts" in k}, strict=False)
    back = nzo.undispatch(model)
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert type(back.model.layers[0].mlp.experts).__name__ == "MixtralExperts"


def _routed_experts(plain, ids) -> dict[int, set[int]]:
    """Per layer, the experts the router picks for ``ids`` (from the plain model's own run)."""
    picked: dict[int, set[int]] = {}
    hooks = []
    for i, layer in enumerate(plain.model.layers):

        def hook(m, args, out, i=i):
            picked[i] = set(out[2].flatten().tolist())  # (logits, scores, indices)

        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        plain(ids)
    for h in hooks:
        h.remove()
    return picked


def test_a_forward_fetches_only_the_routed_experts():
    plain = tiny_moe("mixtral", layers=2)
    ids = torch.tensor([[5]])  # one token: top-2 of 8 per layer
    picked = _routed_experts(plain, ids)
    model = _dispatch(copy.deepcopy(plain), share=0.6, speculate=False)
    ex = model.neuzip.executor
    ex.events.clear()
    with torch.no_grad():
        model(ids)
    requested = {e[1] for e in ex.events if e[0] == "request" and "experts[" in e[1]}
    expected = {f"model.layers.{i}.mlp.experts[{e}]" for i, es in picked.items() for e in es}
    assert requested <= expected and len(expected) == 4
    s = model.neuzip.stats["experts"]
    assert s["uses"] == 4
    expert_bytes = sum(b.decoded_bytes for b in model.neuzip.plan.blocks if b.routed)
    assert s["decoded_bytes"] <= 2 / 8 * expert_bytes


def test_lossy_moe_runs_the_weights_its_state_dict_holds():
    plain = tiny_moe("qwen2_moe")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    model = _dispatch(copy.deepcopy(plain), mode="lossy", mantissa_bits=3)
    with torch.no_grad():
        out = model(ids).logits
    twin = copy.deepcopy(plain)
    twin.load_state_dict(model.state_dict())  # the lossy values, decoded
    with torch.no_grad():
        assert torch.equal(out, twin(ids).logits)
    gu = model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"]
    assert not torch.equal(gu, plain.state_dict()["model.layers.0.mlp.experts.gate_up_proj"])


def test_training_experts_is_refused_with_the_way_out():
    model = tiny_moe("mixtral", layers=1)
    with pytest.raises(NotImplementedError, match="freeze them"):
        nzo.dispatch(
            model,
            device="cpu",
            codec="zstd",
            trainable=True,
            optimizer=nzo.optim.SGD(lr=0.1),
            progress=False,
        )


class _ExpertMLP(torch.nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, inter, bias=False)
        self.w2 = torch.nn.Linear(inter, hidden, bias=False)
        self.w3 = torch.nn.Linear(hidden, inter, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class _ListMoE(torch.nn.Module):
    """The per-expert Linear layout of older models (transformers 4's Mixtral block)."""

    def __init__(self, hidden: int, inter: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(_ExpertMLP(hidden, inter) for _ in range(experts))

    def forward(self, h):
        weights, chosen = torch.topk(self.gate(h).softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(h)
        for e in chosen.unique().tolist():
            rows, slot = torch.where(chosen == e)
            out.index_add_(0, rows, self.experts[e](h[rows]) * weights[rows, slot, None])
        return out


class _ListModel(torch.nn.Module):
    def __init__(self, layers: int = 3, hidden: int = 32, vocab: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {"attn": torch.nn.Linear(hidden, hidden), "moe": _ListMoE(hidden, 64, 8, 2)}
            )
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids).flatten(0, -2)
        for layer in self.layers:
            h = h + layer["attn"](h)
            h = h + layer["moe"](h)
        return self.head(h)


def test_experts_in_a_module_list_are_routed_blocks_too():
    plain = _init(_ListModel(), 3)
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = plain(ids)
    model = _dispatch(copy.deepcopy(plain), share=0.5)
    blocks = {b.name: b for b in model.neuzip.plan.blocks}
    assert blocks["layers.1.moe.experts.5"].routed == "layers.1.moe.experts"
    assert blocks["layers.1.moe.experts.5"].uses == 2 / 8
    with torch.no_grad():
        assert torch.equal(model(ids), ref)
        model.neuzip.executor.events.clear()
        one = torch.tensor([[7]])
        model(one)
    # one token: at most top-2 experts per layer are requested
    requested = [e[1] for e in model.neuzip.executor.events if e[0] == "request"]
    for layer in range(3):
        assert sum(n.startswith(f"layers.{layer}.moe.experts.") for n in requested) <= 2
    order = model.neuzip.executor.order
    names = [model.neuzip.plan.blocks[i].name for i in order]
    assert not any(".experts." in n for n in names)  # experts never join the recorded order


def test_target_bits_chooses_k_per_expert():
    plain = tiny_moe("mixtral", layers=2)
    model = nzo.dispatch(
        copy.deepcopy(plain),
        device="cpu",
        codec="zstd",
        mode="lossy",
        target_bits=7.0,
        progress=False,
    )
    ks = model.neuzip.mantissa_bits
    experts = {k: v for k, v in ks.items() if ".experts." in k}
    assert len(experts) == 2 * 2 * 8  # a width for every expert of both fused tensors
    assert "model.layers.0.mlp.experts.gate_up_proj[5]" in experts
    for key, k in experts.items():
        header = model.neuzip.compressed[key].header
        assert (header.mode, header.mantissa_bits) == ("lossy", k) if k is not None else True
    assert model.neuzip.plan.bits_per_weight <= 7.0 + 1e-3
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    twin = copy.deepcopy(plain)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)


def test_speculation_saves_on_demand_fetches_and_changes_no_token():
    """The next layer's router on this layer's input guesses its experts: fetched ahead, they
    are found decoded when routed (misses avoided), and the tokens stay the same."""
    plain = tiny_mixtral(layers=4)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    runs = {}
    for speculate in (False, True):
        model = _dispatch(copy.deepcopy(plain), share=0.5, speculate=speculate)
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=16, do_sample=False)
        runs[speculate] = (tokens, model.neuzip.stats["experts"])
    assert torch.equal(runs[True][0], runs[False][0])
    off, on = runs[False][1], runs[True][1]
    assert on["uses"] == off["uses"]
    assert on["misses_avoided"] > 0 and on["fetches"] < off["fetches"]
    assert 0 < on["guessed_right"] <= min(on["guessed"], on["uses"])
    assert off["guessed"] == off["prefetched"] == 0


def test_expert_fetches_and_guesses_are_stream_ordered(monkeypatch):
    """Under the stream-order checker, with copies as on CUDA (host → staging → expert slot),
    routed fetches and speculative ones reuse slots only after their last reader is done."""
    import dataclasses

    from neuzip_offload import backend, planning

    plan_options = planning.plan_options
    monkeypatch.setattr(
        planning,
        "plan_options",
        lambda *a, **k: dataclasses.replace(plan_options(*a, **k), copies=True),
    )
    plain = tiny_mixtral(layers=3)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = plain(ids).logits
    model = _dispatch(copy.deepcopy(plain), share=0.5, speculate=True)
    ex = model.neuzip.executor
    assert ex.copies and ex.plan.expert_shared_slots == 3
    with backend.checking() as chk, torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(ids).logits, ref)
            model(ids[:1, :1])  # a decode-sized step: few experts, guesses in flight
    s = model.neuzip.stats["experts"]
    assert s["fetches"] > 0 and s["prefetched"] > 0 and ex.stats.copied_bytes > 0
    assert chk.checked >= 4 * ex.stats.fetches


def test_a_dispatched_moe_saves_both_ways(tmp_path):
    """save_compressed → nzo.load, and save_pretrained → transformers' own from_pretrained:
    logits bit-identical to the plain model's."""
    import transformers

    plain = tiny_moe("qwen2_moe")
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = plain(ids).logits
    model = _dispatch(copy.deepcopy(plain), share=0.5)
    nzo.save_compressed(model, tmp_path / "nz")
    loaded = nzo.load(tmp_path / "nz", max_gpu_mem=10**8, device="cpu", progress=False)
    model.save_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
        assert torch.equal(hf(ids).logits, ref)


def test_the_reserve_holds_the_experts_a_grouped_implementation_stacks():
    model = tiny_moe("mixtral")
    experts = model.model.layers[0].mlp.experts
    one_layer = experts.gate_up_proj.nbytes + experts.down_proj.nbytes  # all 8 experts
    model.config._experts_implementation = "grouped_mm"
    grouped = nzo.estimate_reserve(model)
    model.config._experts_implementation = "eager"  # the copy-free loop stacks nothing
    assert grouped - nzo.estimate_reserve(model) == one_layer
    # one token (a decode step) routes to top-2 of 8
    eager_one = nzo.estimate_reserve(model, seq_len=1)
    model.config._experts_implementation = "grouped_mm"
    assert nzo.estimate_reserve(model, seq_len=1) - eager_one == one_layer * 2 // 8  # top-2
