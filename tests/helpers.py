"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from neuzip_offload.kernels import HAS_TRITON

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def all_bf16() -> torch.Tensor:
    """Every one of the 65,536 bf16 bit patterns (NaN payloads, ±0, ±inf, subnormals)."""
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def all_fp16() -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)


def fp32_specials_and_random(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Random fp32 bit patterns (every exponent), plus the special values."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(1 << 31), 1 << 31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor(
        [
            0x00000000,
            0x80000000,
            0x7F800000,
            0xFF800000,
            0x7FC00000,
            0x7F800001,
            0xFFFFFFFF,
            0x00000001,
            0x807FFFFF,
            0x7F7FFFFF,
            0x00800000,
            0x3F800000,
        ],
        dtype=torch.int64,
    ).to(torch.int32)
    return torch.cat([bits, specials]).view(torch.float32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def tiny_llama(tied: bool = False, dtype: torch.dtype = torch.bfloat16, layers: int = 4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=500,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def device_storages(executor, model: nn.Module | None = None) -> dict[int, int]:
    """What an executor (and the model dispatched with it) really hold on its device, found by
    walking tensors, not read from its Accountant: ``{storage address: bytes}``, each once.

    ``device_buffers()`` are the executor's slots, staging, decode workspace and resident
    (decoded or compressed) blocks; the model's parameters and buffers are what it kept
    uncompressed.
    """
    tensors = executor.device_buffers()
    if model is not None:
        tensors += list(model.parameters()) + list(model.buffers())
    out: dict[int, int] = {}
    for t in tensors:
        if t.device == executor.device:
            st = t.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


@contextlib.contextmanager
def weights_handed_out(executor) -> Iterator[list[tuple[str, int]]]:
    """Record ``(key, storage address)`` of every weight the executor hands to a module: in
    forward (``weight``) and in backward (``backward_weight``, where the executor has one)."""
    seen: list[tuple[str, int]] = []
    names = [n for n in ("weight", "backward_weight") if hasattr(executor, n)]

    def spy(real):
        def handed_out(key: str) -> torch.Tensor:
            w = real(key)
            seen.append((key, w.untyped_storage().data_ptr()))
            return w

        return handed_out

    for name in names:
        setattr(executor, name, spy(getattr(executor, name)))
    try:
        yield seen
    finally:
        for name in names:
            delattr(executor, name)  # the class's method again


def check_device_memory(model: nn.Module, budget: int, run) -> None:
    """The budget oracle that does not trust the Accountant: the storages the model and its
    executor hold, plus the plan's reserve and transient allowance, fit ``budget``; ``run()``
    (forwards, backwards) makes no device storage of its own for a weight — every weight a
    module is handed is a view into them — and reallocates none of them."""
    ex = model.neuzip.executor
    plan = model.neuzip.plan
    held = device_storages(ex, model)
    assert sum(held.values()) + plan.options.reserve_bytes + plan.transient_bytes <= budget, (
        sum(held.values()),
        budget,
    )
    with weights_handed_out(ex) as used:
        run()
    assert used, "no weight was asked for"
    outside = sorted({key for key, ptr in used if ptr not in held})
    assert not outside, outside
    assert device_storages(ex, model) == held


def compressed_blocks(shapes_per_block, config=None, seed: int = 0):
    """Random bf16 weights in blocks, compressed, as dispatch hands them to the executor:
    (weights per block, BlockData list, BlockSpec list with setup bytes)."""
    from neuzip_offload.codec import compress_many
    from neuzip_offload.config import CodecConfig
    from neuzip_offload.scheduler.layout import PackedLayout, slot_layout
    from neuzip_offload.scheduler.plan import BlockSpec
    from neuzip_offload.scheduler.store import BlockData

    g = torch.Generator().manual_seed(seed)
    weights, blocks, specs = [], [], []
    for i, shapes in enumerate(shapes_per_block):
        ws = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
        keys = [f"b{i}.w{j}" for j in range(len(ws))]
        cts = compress_many(ws, config or CodecConfig(codec="zstd"))
        weights.append(ws)
        blocks.append(BlockData(f"b{i}", keys, cts))
        specs.append(
            BlockSpec(
                f"b{i}",
                sum(w.numel() for w in ws),
                slot_layout(cts, keys)[1],
                PackedLayout.of(cts).nbytes,
                max(c.numel for c in cts),
                setup_bytes=max(c.nbytes for c in cts),
            )
        )
    return weights, blocks, specs


# ---------------------------------------------------------------------------------------------
# mixture-of-experts models and their checkpoints in the two layouts (expert_layout.py)
# ---------------------------------------------------------------------------------------------


def tiny_mixtral(seed: int = 0, dtype: torch.dtype = torch.bfloat16, layers: int = 2):
    """A transformers-5 Mixtral: 8 experts, top 2, hidden 64, intermediate 128, vocab 256;
    weights drawn with std 0.02 (its initializer_range)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        architectures=["MixtralForCausalLM"],
    )
    return _built(MixtralForCausalLM, cfg, dtype)


def tiny_qwen2_moe(seed: int = 0, dtype: torch.dtype = torch.bfloat16, layers: int = 2):
    """A transformers-5 Qwen2-MoE: 8 experts, top 4, a shared expert (intermediate 128), expert
    intermediate 64, hidden 64, vocab 256; weights drawn with std 0.02."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=4,
        max_position_embeddings=128,
        architectures=["Qwen2MoeForCausalLM"],
    )
    return _built(Qwen2MoeForCausalLM, cfg, dtype)


def _built(cls, cfg, dtype: torch.dtype):
    """Built in ``dtype`` as from_pretrained builds it: float buffers (rotary inv_freq) stay
    fp32, which ``.to(dtype)`` after the fact would round."""
    return cls._from_config(cfg, dtype=dtype).eval()


def _write_checkpoint(model, tensors: dict[str, torch.Tensor], path, shards: int) -> None:
    """config.json and ``tensors`` in ``shards`` safetensors files, names dealt round-robin in
    sorted order (so one expert's projections land in different files), with an index."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(path / "config.json"))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def write_fused_checkpoint(model, path, shards: int = 1) -> None:
    """The model's state dict as it is (transformers 5's fused expert tensors) in safetensors."""
    state = {n: t.detach().contiguous().clone() for n, t in model.state_dict().items()}
    _write_checkpoint(model, state, path, shards)


def write_per_expert_checkpoint(model, path, shards: int = 1) -> None:
    """The model in the Hub's per-expert layout: each fused expert tensor split into one matrix
    per expert and projection (Mixtral: ``block_sparse_moe.experts.E.w1/w3/w2``, its router
    ``block_sparse_moe.gate``; Qwen2-MoE: ``mlp.experts.E.gate_proj/up_proj/down_proj``)."""
    import re

    mixtral = model.config.model_type == "mixtral"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if mixtral:
            name = re.sub(r"\.mlp\.(experts|gate)\.", r".block_sparse_moe.\1.", name)
        m = re.match(r"^(.+\.experts)\.(gate_up_proj|down_proj)$", name)
        if m is None:
            state[name] = t.contiguous().clone()
            continue
        for e in range(t.shape[0]):
            if m.group(2) == "down_proj":
                state[f"{m.group(1)}.{e}.{down}.weight"] = t[e].contiguous().clone()
            else:
                g, u = t[e].chunk(2, dim=0)
                state[f"{m.group(1)}.{e}.{gate}.weight"] = g.contiguous().clone()
                state[f"{m.group(1)}.{e}.{up}.weight"] = u.contiguous().clone()
    _write_checkpoint(model, state, path, shards)
