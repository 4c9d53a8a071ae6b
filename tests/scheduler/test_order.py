"""OrderTracker (scheduler/order.py): recorded orders per phase, prediction, the prefetch window.

Pure bookkeeping, tested on block indices alone; the last test checks that the executor keeps
data-dependent (unpredictable) enters out of the recorded order.
"""

from __future__ import annotations

import pytest
import torch

from neuzip_offload.scheduler.order import OrderTracker


def _pass(t: OrderTracker, phase: str, blocks: list[int]) -> list[int] | None:
    t.begin(phase)
    for b in blocks:
        t.advance(b)
    return t.end(phase)


def test_module_order_predicts_the_first_forward_without_wrapping():
    t = OrderTracker(5)
    t.begin("forward")
    assert t.window(2) == [0, 1]
    t.advance(0)
    assert t.window(2) == [1, 2]
    t.advance(3)  # blocks may be skipped: the cursor follows the block entered
    assert t.window(3) == [4]  # nothing recorded yet: no wrap past the end
    t.advance(4)
    assert t.window(2) == []


def test_the_first_forward_is_recorded_and_then_predicts_with_wrap_around():
    t = OrderTracker(4)
    ran = [2, 0, 3, 1]
    assert _pass(t, "forward", ran) == ran
    assert t.orders == {"forward": ran, "backward": None}
    assert _pass(t, "forward", ran) is None  # recorded once, not again
    t.begin("forward")
    assert t.window(2) == [2, 0]
    t.advance(2)
    t.advance(0)
    t.advance(3)
    # the end of one forward prefetches the start of the next
    assert t.window(2) == [1, 2]
    assert t.window(10) == [1, 2, 0, 3]  # each block at most once
    assert t.window(0) == []


def test_backward_is_predicted_as_the_forward_reversed_then_recorded():
    t = OrderTracker(4)
    _pass(t, "forward", [0, 1, 2, 3])
    t.begin("backward")
    assert t.phase == "backward"
    assert t.window(2) == [3, 2]
    t.advance(3)
    t.advance(1)  # backward skipped block 2 (nothing saved for it)
    assert t.window(2) == [0]  # the forward's order reversed; no wrap until recorded
    assert t.end("backward") == [3, 1]
    assert t.phase == "forward" and t.orders["backward"] == [3, 1]
    t.begin("backward")
    assert t.window(3) == [3, 1]  # the recorded backward order, not the reversed forward


def test_before_any_forward_backward_reverses_module_order():
    t = OrderTracker(3)
    t.begin("backward")
    assert t.predicted() == [2, 1, 0]


def test_a_block_met_again_moves_the_cursor_back_to_its_first_place():
    """A tied weight used twice in one pass (embedding first, head last): its second use
    finds no place after the cursor, so the cursor moves to its first place."""
    t = OrderTracker(4)
    _pass(t, "forward", [0, 1, 2, 3])
    t.begin("forward")
    for b in (0, 1, 2):
        t.advance(b)
    t.advance(1)
    assert t.window(2) == [2, 3]


def test_end_of_another_phase_records_nothing():
    t = OrderTracker(3)
    t.begin("backward")
    t.advance(2)
    assert t.end("forward") is None  # a forward hook during backward
    assert t.orders == {"forward": None, "backward": None}


@pytest.mark.parametrize("copies", [False, True])
def test_unpredictable_enters_neither_join_nor_move_the_order(copies):
    from dataclasses import replace

    import neuzip_offload as nzo
    from neuzip_offload.scheduler.executor import Executor
    from neuzip_offload.scheduler.plan import DEVICE, PlanOptions, make_plan
    from tests.helpers import compressed_blocks, same_bits

    weights, blocks, specs = compressed_blocks([[(16, 24)]] * 5)
    o = PlanOptions(device_bytes=1, host_bytes=10**9, prefetch=1, copies=copies, device="cpu")
    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, o)
    plan = make_plan(specs, replace(o, device_bytes=e.value.minimum_device_bytes))
    assert plan.tiers[4] != DEVICE  # block 4 streams: its unpredictable use fetches it
    ex = Executor(plan, blocks, torch.device("cpu"))
    ex.begin_forward()
    for b in range(5):
        ex.enter(b)
        if b == 1:  # a data-dependent use of block 4 in the middle of the pass
            ex.enter(4, predictable=False)
            assert ex.tracker.window(1) == [2]  # the window still follows block 1
            assert same_bits(ex.weight("b4.w0"), weights[4][0])
            ex.exit(4)
        assert same_bits(ex.weight(f"b{b}.w0"), weights[b][0])
        ex.exit(b)
    ex.end_forward()
    assert ex.order == [0, 1, 2, 3, 4]
    ex.close()
