"""The executor: prefetch order from its event log, the budget at every step, CPU stand-ins."""

from __future__ import annotations

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload.scheduler.plan import HOST
from tests.helpers import tiny_llama


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
    order = [ex._blocks[i].name for i in ex.order]
    streamed = {b.name for b in ex._blocks if b.tier == HOST}
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
    model, budget = _dispatched(prefetch=2)
    ex = model.neuzip.executor
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 1000, (2, 7)))
    held = [ev[2] for ev in ex.events if ev[0] in ("enter", "exit")]
    assert held and max(held) <= budget
    assert ex.accountant.peak <= budget
    assert ex.accountant.held["slots"] == ex.plan.n_slots * ex.plan.slot_bytes


def test_recorded_order_follows_the_forward():
    model, _ = _dispatched(prefetch=2)
    ex = model.neuzip.executor
    assert ex.order is None
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 4)))
    names = [ex._blocks[i].name for i in ex.order]
    layer_names = [n for n in names if n.startswith("model.layers.")]
    assert layer_names == [f"model.layers.{i}" for i in range(6)]
    assert names[-1].startswith("lm_head")  # the untied head runs last


def test_weights_outside_their_block_are_refused():
    model, _ = _dispatched(prefetch=1)
    ex = model.neuzip.executor
    streamed = next(b for b in ex._blocks if b.tier == HOST)
    with pytest.raises(RuntimeError, match="outside its block"):
        ex.weight(streamed.keys[0])


def test_cpu_stand_ins_are_complete_at_once():
    from neuzip_offload import backend

    ev = backend.CpuEvent()
    ev.record()
    assert ev.query()
    s = backend.CpuStream()
    s.wait_event(ev)
    with backend.on_stream(s):
        pass
    t = torch.ones(4)
    assert backend.pin(t) is t or torch.cuda.is_available()


def test_the_staging_path_copies_and_decodes_exactly():
    """The copy-stream path (pinned host → staging → slot) run with the CPU stand-ins."""
    from neuzip_offload.scheduler.executor import Executor
    from neuzip_offload.scheduler.plan import PlanOptions, make_plan
    from tests.helpers import compressed_blocks, same_bits

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
    for _ in range(2):
        ex.begin_forward()
        for i, ws in enumerate(weights):
            ex.enter(i)
            for j, w in enumerate(ws):
                assert same_bits(ex.weight(f"b{i}.w{j}"), w)
            ex.exit(i)
        ex.end_forward()
    assert ex.stats.copied_bytes > 0 and ex.accountant.peak <= o.device_bytes
    ex.close()
