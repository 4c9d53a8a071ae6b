"""The planner: a pure function of sizes and budgets."""

from __future__ import annotations

import pytest

from neuzip_offload.scheduler.plan import (
    DEVICE,
    DEVICE_COMPRESSED,
    HOST,
    BlockSpec,
    PlanError,
    PlanOptions,
    make_plan,
)

MB = 10**6


def layers(n=10, decoded=10 * MB, compressed=7 * MB):
    return [BlockSpec(f"layer{i}", decoded // 2, decoded, compressed, 64 * 1024) for i in range(n)]


def test_everything_fits_decoded():
    plan = make_plan(layers(), PlanOptions(device_bytes=200 * MB, host_bytes=10**10))
    assert plan.tiers == (DEVICE,) * 10
    assert plan.n_slots == 0 and plan.pcie_bytes_per_forward == 0
    assert plan.gpu_bytes == 100 * MB


def test_tight_budget_streams_and_stays_within_it():
    o = PlanOptions(device_bytes=60 * MB, host_bytes=10**10, reserve_bytes=5 * MB, prefetch=2)
    plan = make_plan(layers(), o)
    assert HOST in plan.tiers
    assert plan.gpu_bytes + o.reserve_bytes <= o.device_bytes
    assert plan.n_slots == 3 and plan.slot_bytes == 10 * MB
    assert plan.pcie_bytes_per_forward == sum(
        b.compressed_bytes for b, t in zip(plan.blocks, plan.tiers, strict=True) if t == HOST
    )
    assert plan.seconds_lower_bound(25) == pytest.approx(plan.pcie_bytes_per_forward / 25e9)


def test_with_copies_compressed_residency_is_preferred_per_byte_when_decoding_is_fast():
    fast = PlanOptions(device_bytes=80 * MB, host_bytes=10**10, decode_gbps=800)
    plan = make_plan(layers(), fast)
    assert plan.tiers.count(DEVICE_COMPRESSED) > plan.tiers.count(DEVICE)
    # a slow decoder (as measured at dispatch) makes decoded residency worth its bytes
    slow = make_plan(layers(), PlanOptions(device_bytes=80 * MB, host_bytes=10**10, decode_gbps=5))
    assert slow.tiers.count(DEVICE) > slow.tiers.count(DEVICE_COMPRESSED)


def test_without_copies_only_decoded_residency_pays():
    o = PlanOptions(device_bytes=80 * MB, host_bytes=10**10, copies=False, decode_gbps=1.5)
    plan = make_plan(layers(), o)
    assert DEVICE_COMPRESSED not in plan.tiers and DEVICE in plan.tiers
    assert plan.n_staging == 0


def test_more_budget_never_moves_more_over_pcie():
    prev = None
    for mb in range(50, 200, 10):
        plan = make_plan(layers(), PlanOptions(device_bytes=mb * MB, host_bytes=10**10))
        if prev is not None:
            assert plan.pcie_bytes_per_forward <= prev
        prev = plan.pcie_bytes_per_forward


def test_too_small_budget_names_the_minimum():
    o = PlanOptions(device_bytes=20 * MB, host_bytes=10**10, reserve_bytes=MB)
    with pytest.raises(PlanError, match="max_gpu_mem=.* too small.*needs at least") as e:
        make_plan(layers(), o)
    minimum = e.value.minimum_device_bytes
    plan = make_plan(
        layers(), PlanOptions(device_bytes=minimum, host_bytes=10**10, reserve_bytes=MB)
    )
    assert plan.gpu_bytes + MB <= minimum


def test_a_large_block_can_live_resident_to_shrink_the_slots():
    blocks = [*layers(4), BlockSpec("embed", 50 * MB, 100 * MB, 70 * MB)]
    o = PlanOptions(device_bytes=148 * MB, host_bytes=10**10, reserve_bytes=10 * MB, prefetch=1)
    plan = make_plan(blocks, o)  # all decoded would need 150 MB; streaming the embed, 210 MB
    assert plan.tier_of("embed") == DEVICE and plan.slot_bytes == 10 * MB
    assert plan.gpu_bytes + o.reserve_bytes <= o.device_bytes


def test_host_budget_is_enforced():
    with pytest.raises(PlanError, match="max_cpu_mem"):
        make_plan(layers(), PlanOptions(device_bytes=60 * MB, host_bytes=10 * MB))


def test_plan_prints_a_table_with_totals():
    plan = make_plan(layers(3), PlanOptions(device_bytes=45 * MB, host_bytes=10**10))
    text = str(plan)
    for name, tier in zip(("layer0", "layer1", "layer2"), plan.tiers, strict=True):
        assert name in text and tier in text
    assert "bits/weight" in text and "over PCIe" in text and "lower bound" in text
    assert plan.bits_per_weight == pytest.approx(8 * 21 * MB / (15 * MB))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="prefetch"):
        PlanOptions(device_bytes=1, host_bytes=1, prefetch=-1)
