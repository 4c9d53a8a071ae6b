"""The executor: prefetch order from its event log, the bytes it allocates, the staging path."""

from __future__ import annotations

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload.scheduler.plan import HOST
from tests.helpers import device_storages, tiny_llama


def _dispatched(prefetch: int, layers: int = 6):
    model = tiny_llama(layers=layers)
    with pytest.raises(nzo.PlanError) as e:
        nzo.dispatch(
            tiny_llama(layers=layers),
            max_gpu_mem=1,
            reserve=0,
            prefetch=prefetch,
            progress=False,
            granularity="layer",
        )
    budget = e.value.minimum_device_bytes
    nzo.dispatch(
        model, max_gpu_mem=budget, reserve=0, prefetch=prefetch, progress=False, granularity="layer"
    )
    return model, budget


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_when_block_j_runs_the_next_blocks_have_been_requested(prefetch):
    model, _ = _dispatched(prefetch)
    ex = model.neuzip.executor
    ids = torch.randint(0, 1000, (1, 5))
    with torch.no_grad():
        model(ids)  # the first forward records the order
        start = len(ex.events)
        model(ids)
    order = [ex.blocks()[i].name for i in ex.order]
    streamed = {b.name for b in ex.blocks() if b.tier == HOST}
    events = list(ex.events)
    checked = 0
    for pos in range(start, len(events)):
        kind, name = events[pos][0], events[pos][1]
        if kind != "exit" or name not in order:
            continue
        # while block j ran (by its exit), each of the next `prefetch` blocks of the order had
        # been requested since its own last use, so its copy and decode were already under way
        j = order.index(name)
        for u in (order[(j + i) % len(order)] for i in range(1, prefetch + 1)):
            if u not in streamed:
                continue
            last_request = max(
                (i for i in range(pos) if events[i][:2] == ("request", u)), default=-1
            )
            last_use = max((i for i in range(pos) if events[i][:2] == ("exit", u)), default=-1)
            assert last_request > last_use, (name, u, prefetch)
            checked += 1
    assert checked >= len(order) - 1


def test_the_budget_holds_at_every_step():
    """The bytes the executor really allocated fit the budget, and every weight a block runs
    with is a view into them (so no forward allocates weights of its own)."""
    model, budget = _dispatched(prefetch=2)
    ex = model.neuzip.executor
    storages = device_storages(ex, model)
    assert 0 < sum(storages.values()) <= budget - ex.plan.options.reserve_bytes
    handed_out = []
    original = ex.weight

    def spy(key: str) -> torch.Tensor:
        w = original(key)
        handed_out.append((key, w.untyped_storage().data_ptr()))
        return w

    ex.weight = spy
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 1000, (2, 7)))
    assert len(handed_out) >= 3 * sum(len(b.keys) for b in ex.blocks())
    outside = [key for key, ptr in handed_out if ptr not in storages]
    assert not outside, outside
    assert device_storages(ex, model) == storages  # nothing was reallocated by the forwards


def test_recorded_order_follows_the_forward():
    model, _ = _dispatched(prefetch=2)
    ex = model.neuzip.executor
    assert ex.order is None
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 4)))
    names = [ex.blocks()[i].name for i in ex.order]
    layer_names = [n for n in names if n.startswith("model.layers.")]
    assert layer_names == [f"model.layers.{i}" for i in range(6)]
    assert names[-1].startswith("lm_head")  # the untied head runs last


def test_weights_outside_their_block_are_refused():
    model, _ = _dispatched(prefetch=1)
    ex = model.neuzip.executor
    streamed = next(b for b in ex.blocks() if b.tier == HOST)
    with pytest.raises(RuntimeError, match="outside its block"):
        ex.weight(streamed.keys[0])


def test_the_staging_path_copies_and_decodes_exactly():
    """The copy-stream path (pinned host → staging → slot) run with the CPU stand-ins."""
    from neuzip_offload.scheduler.executor import Executor
    from neuzip_offload.scheduler.plan import PlanOptions, make_plan
    from tests.helpers import compressed_blocks

    weights, blocks, specs = compressed_blocks([((32, 48), (7,), (48, 32))] * 5)
    o = PlanOptions(device_bytes=1, host_bytes=10**9, prefetch=2, copies=True, device="cpu")
    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, o)
    o = PlanOptions(
        device_bytes=e.value.minimum_device_bytes,
        host_bytes=10**9,
        prefetch=2,
        copies=True,
        device="cpu",
    )
    plan = make_plan(specs, o)
    assert "host" in plan.tiers and plan.n_staging == 2
    ex = Executor(plan, blocks, torch.device("cpu"))
    held = device_storages(ex)  # slots and staging, found by walking the executor's buffers
    assert sum(held.values()) + plan.transient_bytes <= o.device_bytes
    _forwards_are_exact(ex, weights, 2)
    assert ex.stats.copied_bytes > 0 and device_storages(ex) == held
    ex.close()


def test_the_device_compressed_tier_is_built_and_decodes_exactly():
    """Blocks kept compressed on the device (copied there once at setup) decode bit-exactly."""
    from neuzip_offload.scheduler.executor import Executor
    from neuzip_offload.scheduler.plan import DEVICE_COMPRESSED, PlanOptions, make_plan
    from tests.helpers import compressed_blocks

    weights, blocks, specs = compressed_blocks([((32, 48), (7,), (48, 32))] * 12)

    def options(device_bytes: int) -> PlanOptions:
        # a fast decoder (1 TB/s) against 25 GB/s PCIe: per device byte, keeping a block
        # compressed saves more copy time than keeping it decoded
        return PlanOptions(
            device_bytes=device_bytes,
            host_bytes=10**9,
            prefetch=2,
            copies=True,
            device="cpu",
            decode_gbps=1000.0,
        )

    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, options(1))
    # 8 KB above the minimum: room for some blocks compressed, not for decoded ones
    plan = make_plan(specs, options(e.value.minimum_device_bytes + 8000))
    assert DEVICE_COMPRESSED in plan.tiers and HOST in plan.tiers
    ex = Executor(plan, blocks, torch.device("cpu"))
    kept = [b for b in ex.blocks() if b.tier == DEVICE_COMPRESSED]
    assert kept
    # their planes are copies in one packed buffer per block, not the caller's tensors
    for b in kept:
        ptrs = {p.untyped_storage().data_ptr() for ct in b.cts for p in ct.planes.values()}
        theirs = {
            p.untyped_storage().data_ptr() for ct in blocks[b.index].cts for p in ct.planes.values()
        }
        assert len(ptrs) == 1 and not ptrs & theirs
    _forwards_are_exact(ex, weights, 2)
    # every fetch ("request") of a host block copies its packed bytes to staging; fetches of
    # device-compressed blocks decode from device memory and copy nothing
    by_name = {b.name: b for b in ex.blocks()}
    requested = [by_name[ev[1]] for ev in ex.events if ev[0] == "request"]
    assert {b.name for b in kept} <= {b.name for b in requested}
    assert ex.stats.copied_bytes == sum(b.packed_nbytes for b in requested if b.tier == HOST)
    ex.close()


def _forwards_are_exact(ex, weights, forwards: int) -> None:
    """Run ``forwards`` passes over every block by hand; each weight must equal its original."""
    from tests.helpers import same_bits

    for _ in range(forwards):
        ex.begin_forward()
        for i, ws in enumerate(weights):
            ex.enter(i)
            for j, w in enumerate(ws):
                assert same_bits(ex.weight(f"b{i}.w{j}"), w)
            ex.exit(i)
        ex.end_forward()
