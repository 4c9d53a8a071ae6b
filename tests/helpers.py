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
