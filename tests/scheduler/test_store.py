"""The block store (scheduler/store.py): tiers materialized at setup (blocks never encoded taken
as they are), re-packing of re-encoded host blocks (in their region while they fit, else into
a new buffer) with exact decodes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload import sizing
from neuzip_offload.codec import compress_many
from neuzip_offload.config import CodecConfig
from neuzip_offload.scheduler.executor import Executor
from neuzip_offload.scheduler.layout import PackedLayout, slot_layout
from neuzip_offload.scheduler.plan import DEVICE, HOST, BlockSpec, PlanOptions, make_plan
from neuzip_offload.scheduler.store import BlockData
from tests.helpers import same_bits

CFG = CodecConfig(codec="zstd")
SHAPE = (64, 64)


def _block(i: int, w: torch.Tensor) -> tuple[BlockData, BlockSpec]:
    cts = compress_many([w], CFG)
    keys = [f"b{i}.w0"]
    packed = PackedLayout.of(cts).nbytes
    spec = BlockSpec(
        f"b{i}", w.numel(), slot_layout(cts, keys)[1], packed, w.numel(), setup_bytes=cts[0].nbytes
    )
    return BlockData(f"b{i}", keys, cts), spec


def _weights(kind: str, seed: int) -> torch.Tensor:
    if kind == "flat":  # one exponent: its planes compress to almost nothing
        return torch.ones(SHAPE, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=g) * 100).to(torch.bfloat16)


def _run(ex: Executor, weights: list[torch.Tensor]) -> None:
    ex.begin_forward()
    for i, w in enumerate(weights):
        ex.enter(i)
        assert same_bits(ex.weight(f"b{i}.w0"), w)
        ex.exit(i)
    ex.end_forward()


def _update(ex: Executor, b: int, key: str, new: torch.Tensor):
    """What training does: the weight is updated in its slot, re-encoded, and replaced."""
    ex.enter(b, predictable=False)
    ex.weight(key).copy_(new)
    (ct,) = compress_many([new], CFG)
    ex.replace(key, ct)
    ex.exit(b)
    return ct


def _refetched(ex: Executor, name: str, since: int) -> bool:
    return any(ev[:2] == ("request", name) for ev in list(ex.events)[since:])


def test_a_reencoded_host_block_is_repacked_and_decodes_exactly():
    weights = [_weights("flat", i) for i in range(4)]
    made = [_block(i, w) for i, w in enumerate(weights)]
    blocks, specs = [m[0] for m in made], [m[1] for m in made]
    # training's options: copies (as on CUDA), no device-compressed tier, 1/64 spare per region
    o = PlanOptions(
        device_bytes=1, host_bytes=10**9, prefetch=1, copies=True, device="cpu",
        device_compressed=False,
    )  # fmt: skip
    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, o)
    # room to grow a staging buffer (as a trainable dispatch's scratch gives), still streaming
    budget = e.value.minimum_device_bytes + 8192
    plan = make_plan(specs, dataclasses.replace(o, device_bytes=budget))
    ex = Executor(plan, blocks, torch.device("cpu"))
    _run(ex, weights)
    b = next(v for v in ex.blocks() if v.tier == HOST)
    key = b.keys[0]
    region = ex.compressed(key).planes["raw"].untyped_storage().data_ptr()
    staging = ex.accountant.held["staging"]

    # 1. re-encoded to many more bytes: packed into a new buffer, staging grown to hold it
    weights[b.index] = _weights("random", 1)
    since = len(ex.events)
    grown = _update(ex, b.index, key, weights[b.index])
    assert PackedLayout.of([grown]).nbytes > b.packed_nbytes * 65 // 64
    for _ in range(2):
        _run(ex, weights)
    assert _refetched(ex, b.name, since)  # decoded again from its re-packed bytes
    now = ex.blocks()[b.index]
    assert now.packed_nbytes == PackedLayout.of([grown]).nbytes
    moved = ex.compressed(key).planes["raw"].untyped_storage().data_ptr()
    assert moved != region and ex.accountant.held["staging"] > staging

    # 2. re-encoded to about the same size again: packed in place, in its (new) region
    weights[b.index] = _weights("random", 2)
    since = len(ex.events)
    same = _update(ex, b.index, key, weights[b.index])
    assert PackedLayout.of([same]).nbytes <= now.packed_nbytes
    for _ in range(2):
        _run(ex, weights)
    assert _refetched(ex, b.name, since)
    planes = ex.compressed(key).planes
    assert planes["raw"].untyped_storage().data_ptr() == moved
    assert torch.equal(planes["raw"], same.planes["raw"].reshape(-1))
    ex.close()


def test_only_host_blocks_take_reencoded_weights():
    weights = [_weights("random", i) for i in range(2)]
    made = [_block(i, w) for i, w in enumerate(weights)]
    o = PlanOptions(device_bytes=10**8, host_bytes=10**9, copies=True, device="cpu")
    ex = Executor(make_plan([m[1] for m in made], o), [m[0] for m in made], torch.device("cpu"))
    assert {v.tier for v in ex.blocks()} == {"device"}
    (ct,) = compress_many([weights[0]], CFG)
    with pytest.raises(RuntimeError, match="cannot take re-encoded weights"):
        ex.replace("b0.w0", ct)
    ex.close()


def _never_encoded(i: int, w: torch.Tensor) -> tuple[BlockData, BlockSpec]:
    """A block dispatch did not encode: stand-ins for its tensors, its weights as they are."""
    (ct,) = [sizing.unencoded(w, CFG, f"b{i}.w0")]
    keys = [f"b{i}.w0"]
    spec = BlockSpec(f"b{i}", w.numel(), slot_layout([ct], keys)[1], PackedLayout.of([ct]).nbytes)
    return BlockData(f"b{i}", keys, [ct], decoded=[w]), spec


def test_a_block_never_encoded_is_resident_as_it_is():
    flat = _weights("random", 0)
    strided = _weights("random", 1).t()  # not contiguous: copied into a resident tensor
    made = [_never_encoded(0, flat), _never_encoded(1, strided), _block(2, _weights("flat", 2))]
    o = PlanOptions(device_bytes=10**8, host_bytes=10**9, copies=False, device="cpu")
    plan = make_plan([m[1] for m in made], o)
    ex = Executor(plan, [m[0] for m in made], torch.device("cpu"))
    assert {v.tier for v in ex.blocks()} == {DEVICE}
    assert ex.weight("b0.w0").data_ptr() == flat.data_ptr()  # handed over: no copy
    assert ex.weight("b1.w0").data_ptr() != strided.data_ptr()
    assert same_bits(ex.weight("b1.w0"), strided) and ex.weight("b1.w0").is_contiguous()
    assert ex.accountant.held["resident decoded"] == 3 * SHAPE[0] * SHAPE[1] * 2
    assert all(ct.device.type == "meta" for v in ex.blocks() for ct in v.cts)
    ex.close()


def test_a_block_never_encoded_cannot_stream():
    made = [_never_encoded(i, _weights("random", i)) for i in range(3)]
    o = PlanOptions(device_bytes=1, host_bytes=10**9, prefetch=0, copies=False, device="cpu")
    with pytest.raises(nzo.PlanError) as e:
        make_plan([m[1] for m in made], o)
    plan = make_plan(
        [m[1] for m in made], dataclasses.replace(o, device_bytes=e.value.minimum_device_bytes)
    )
    assert HOST in plan.tiers
    with pytest.raises(ValueError, match="never encoded: it cannot be host"):
        Executor(plan, [m[0] for m in made], torch.device("cpu"))
