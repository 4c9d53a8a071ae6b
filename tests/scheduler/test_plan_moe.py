"""The planner with mixture-of-experts blocks: expert pools, the cache choice, per-token figures."""

from __future__ import annotations

from dataclasses import replace

import pytest

from neuzip_offload.scheduler.experts_plan import choose_cache, expert_groups
from neuzip_offload.scheduler.plan import (
    DEVICE,
    DEVICE_COMPRESSED,
    DISK,
    HOST,
    BlockSpec,
    PlanError,
    PlanOptions,
    make_plan,
)

MB = 10**6
GIB = 2**30


def mixtral(expert_bits: float = 10.6) -> list[BlockSpec]:
    """Mixtral-8x7B as the planner sees it: bf16 weights (2 bytes decoded), lossless at 10.6 of
    16 bits, each layer's attention one block and each of its 8 experts one routed block."""
    attention = 4096 * 4096 * 2 + 1024 * 4096 * 2  # q, o; k, v (8 KV heads of 128)
    expert = 3 * 4096 * 14336  # gate, up, down
    embed = 32000 * 4096

    def spec(name, n, bits=10.6, **routing):
        return BlockSpec(name, n, 2 * n, int(n * bits / 8), 1 << 20, **routing)

    blocks = [spec("model.embed_tokens", embed)]
    for layer in range(32):
        group = f"model.layers.{layer}.mlp.experts"
        blocks.append(spec(f"model.layers.{layer}.self_attn", attention))
        blocks += [
            spec(f"{group}[{e}]", expert, expert_bits, uses=2 / 8, routed=group) for e in range(8)
        ]
    return [*blocks, spec("lm_head", embed)]


def mixtral_options(**changes) -> PlanOptions:
    o = PlanOptions(
        device_bytes=int(24e9),
        host_bytes=int(64e9),
        reserve_bytes=2 * GIB,
        pcie_gbps=25,
        decode_gbps=600,
    )
    return replace(o, **changes)


def by_hand(plan) -> tuple[float, float, float, float]:
    """(PCIe bytes, decoded bytes, hit rate, copy-free rate) per token from the tiers and the
    model: an expert is in its layer's pool of P slots with probability P/E."""
    pcie = decoded = hits = copy_free = uses = 0.0
    for b, t in zip(plan.blocks, plan.tiers, strict=True):
        if b.routed is None:
            pcie += b.uses * b.compressed_bytes * (t in (HOST, DISK))
            decoded += b.uses * b.decoded_bytes * (t != DEVICE)
            continue
        hit = plan.expert_slots / 8
        copy_hit = 1.0 if t in (DEVICE, DEVICE_COMPRESSED) else hit
        pcie += b.uses * b.compressed_bytes * (1 - copy_hit)
        decoded += b.uses * b.decoded_bytes * (1 - hit)
        uses += b.uses
        hits += b.uses * hit
        copy_free += b.uses * copy_hit
    return pcie, decoded, hits / uses, copy_free / uses


@pytest.mark.parametrize("speculate", [True, False])
@pytest.mark.parametrize(("bits", "seconds"), [(10.6, 0.6), (6.6, 0.4)], ids=["lossless", "k3"])
def test_mixtral_8x7b_per_token_bound_on_a_24gb_gpu(bits, seconds, speculate):
    o = mixtral_options(speculate=speculate)
    plan = make_plan(mixtral(bits), o)
    assert plan.gpu_bytes + o.reserve_bytes <= o.device_bytes
    assert plan.host_bytes <= o.host_bytes
    assert plan.seconds_bound() <= seconds
    # the regular blocks are resident; every routed block streams or sits compressed
    assert all(t == DEVICE for b, t in zip(plan.blocks, plan.tiers, strict=True) if not b.routed)
    assert {t for b, t in zip(plan.blocks, plan.tiers, strict=True) if b.routed} <= {
        DEVICE_COMPRESSED,
        HOST,
    }
    assert plan.expert_slot_bytes == 2 * 3 * 4096 * 14336
    assert plan.expert_shared_slots == (3 if speculate else 1)
    assert plan.expert_pool_slots == 32 * plan.expert_slots + plan.expert_shared_slots
    pcie, decoded, hit, copy_free = by_hand(plan)
    assert plan.pcie_bytes_per_forward == pytest.approx(pcie, abs=1)
    assert plan.decoded_bytes_per_forward == pytest.approx(decoded, abs=1)
    assert plan.expert_hit_rate == pytest.approx(hit)
    assert plan.expert_copy_hit_rate == pytest.approx(copy_free)
    assert plan.seconds_bound() == pytest.approx(max(pcie / 25e9, decoded / 600e9))


def test_mixtral_k3_keeps_experts_resident_compressed_in_the_room_left():
    plan = make_plan(mixtral(6.6), mixtral_options())
    routed = [t for b, t in zip(plan.blocks, plan.tiers, strict=True) if b.routed]
    # experts dealt round-robin: every layer's first ones, counts differ by at most one
    assert routed.count(DEVICE_COMPRESSED) > 0
    per_group = [
        sum(plan.tiers[i] == DEVICE_COMPRESSED for i in g.members) for g in plan.expert_groups
    ]
    assert max(per_group) - min(per_group) <= 1
    first = plan.expert_groups[0]
    assert plan.tier_of("model.layers.0.mlp.experts[0]") == DEVICE_COMPRESSED
    assert plan.tier_of(plan.blocks[first.members[-1]].name) == HOST
    assert plan.expert_copy_hit_rate > plan.expert_hit_rate


def test_mixtral_speculation_needs_only_shared_working_slots():
    """The guesses land in working slots all layers share (top_k + 1), not in a top_k pool per
    layer, which would take 64 x 336 MiB of a 24 GB GPU."""
    plan = make_plan(mixtral(), mixtral_options(speculate=True))
    assert plan.expert_shared_slots == 3
    assert plan.gpu_bytes + plan.options.reserve_bytes <= 24e9


def test_mixtral_table_has_one_row_per_layer_of_experts():
    plan = make_plan(mixtral(6.6), mixtral_options())
    text = str(plan)
    assert "model.layers.3.mlp.experts[0..7]" in text and "experts[5]" not in text
    row = next(line for line in text.splitlines() if "layers.3.mlp.experts[0..7]" in line)
    resident = sum(plan.tiers[i] == DEVICE_COMPRESSED for i in plan.expert_groups[3].members)
    assert 0 < resident < 8 and row.endswith(f"{resident} device-compressed + {8 - resident} host")
    assert "experts: 256 in 32 groups, top-2 of 8 per token; cache: " in text
    assert f"{plan.expert_hit_rate:.1%}" in text and "per token:" in text
    assert "per forward:" not in text
    assert len(text.splitlines()) < 90  # 66 regular rows, 32 expert rows: not 322


# -- a small model: 4 MoE layers of 8 experts, top-2 ------------------------------------------


def small(decoded=8 * MB, compressed=2 * MB, layers=4, experts=8, top_k=2):
    blocks = []
    for layer in range(layers):
        group, uses = f"layer{layer}.experts", top_k / experts
        blocks.append(BlockSpec(f"attn{layer}", MB // 2, MB, MB // 2, 1024))
        blocks += [
            BlockSpec(f"{group}[{e}]", decoded // 2, decoded, compressed, 4096, uses, routed=group)
            for e in range(experts)
        ]
    return blocks


def test_groups_know_their_top_k():
    groups = expert_groups(small())
    assert [g.name for g in groups] == [f"layer{i}.experts" for i in range(4)]
    assert all(g.top_k == 2 and g.experts == 8 for g in groups)
    assert groups[0].members == tuple(range(1, 9)) and groups[0].label == "layer0.experts[0..7]"
    assert groups[0].hit_rate(3) == 3 / 8 and groups[0].hit_rate(20) == 1


def test_minimum_is_the_shared_slots_top_k_plus_one_with_speculation_one_without():
    for speculate, shared in ((True, 3), (False, 1)):
        o = PlanOptions(device_bytes=MB, host_bytes=10**10, speculate=speculate)
        with pytest.raises(PlanError, match=rf"and {shared} expert slots of 7.63 MiB") as e:
            make_plan(small(), o)
        plan = make_plan(small(), replace(o, device_bytes=e.value.minimum_device_bytes))
        assert plan.expert_slots == 0 and plan.expert_shared_slots == shared
        assert plan.expert_slot_bytes == 8 * MB
        assert plan.gpu_bytes == e.value.minimum_device_bytes
        assert plan.expert_hit_rate == 0  # the shared slots' hits are not counted
        # the regular slots serve the attention blocks only; staging and workspace fit experts
        assert plan.slot_bytes <= MB and plan.staging_bytes == 2 * MB
        assert plan.workspace_bytes == 4096


def test_everything_resident_needs_no_pools():
    plan = make_plan(small(), PlanOptions(device_bytes=10**9, host_bytes=10**10))
    assert set(plan.tiers) == {DEVICE} and plan.expert_slots == 0 and plan.expert_cache == ""
    assert plan.expert_hit_rate == 1 and plan.pcie_bytes_per_forward == 0
    assert "cache: none" in str(plan) and "layer2.experts[0..7]" in str(plan)


def test_without_copies_the_cache_is_decoded():
    o = PlanOptions(device_bytes=150 * MB, host_bytes=10**10, copies=False, decode_gbps=2)
    plan = make_plan(small(), o)
    assert plan.expert_cache == "decoded" and DEVICE_COMPRESSED not in plan.tiers
    assert 2 < plan.expert_slots < 8  # more than the minimum, as far as the budget goes
    assert plan.gpu_bytes <= o.device_bytes
    assert plan.gpu_bytes + 4 * 8 * MB > o.device_bytes  # one more slot per pool would not fit


def alternatives(plan):
    """Every hand-made expert cache beside the plan's regular blocks that fits its budget:
    (slots per pool; experts resident compressed per layer) → bound."""
    bounds = {}
    for slots in range(0, 9):
        for resident in range(0, 9):
            tiers = list(plan.tiers)
            for g in plan.expert_groups:
                for n, i in enumerate(g.members):
                    tiers[i] = DEVICE_COMPRESSED if n < resident else HOST
            trial = replace(plan, tiers=tuple(tiers), expert_slots=slots)
            if trial.gpu_bytes + plan.options.reserve_bytes <= plan.options.device_bytes:
                bounds[slots, resident] = trial.seconds_bound()
    return bounds


@pytest.mark.parametrize("pcie", [1.0, 25.0])
def test_the_cache_of_the_smaller_bound_is_chosen(pcie):
    o = PlanOptions(device_bytes=120 * MB, host_bytes=10**10, pcie_gbps=pcie, decode_gbps=100)
    plan = make_plan(small(), o)
    resident = sum(plan.tiers[i] == DEVICE_COMPRESSED for i in plan.expert_groups[0].members)
    bounds = alternatives(plan)
    assert bounds[plan.expert_slots, resident] == pytest.approx(plan.seconds_bound())
    decoded_only = min(b for (_, r), b in bounds.items() if r == 0)
    compressed_first = min(b for (s, _), b in bounds.items() if s == 2)
    assert plan.seconds_bound() <= min(decoded_only, compressed_first)
    if pcie == 1.0:  # copies dominate: 4 compressed experts save more than 1 decoded slot
        assert plan.expert_cache == "compressed" and resident >= 4
        assert plan.seconds_bound() < decoded_only
    else:  # decoding dominates: compressed residency saves nothing
        assert plan.expert_cache == "decoded" and resident == 0


def test_room_left_after_compressed_residency_buys_decoded_slots():
    o = PlanOptions(device_bytes=170 * MB, host_bytes=10**10, pcie_gbps=1, decode_gbps=100)
    plan = make_plan(small(), o)
    assert plan.expert_cache == "compressed"
    assert plan.tiers.count(DEVICE_COMPRESSED) == 4 * 8 and plan.n_staging == 0
    assert plan.expert_slots == 2 and plan.expert_copy_hit_rate == 1
    assert plan.pcie_bytes_per_forward == 0 and plan.gpu_bytes <= o.device_bytes


def test_ties_keep_the_decoded_cache():
    groups = expert_groups(small())
    choice = choose_cache(groups, 2, lambda s, r: s + r <= 4, lambda s, r: 1.0, compressed=True)
    assert choice.kind == "decoded" and (choice.slots, choice.resident) == (4, 0)
    choice = choose_cache(
        groups, 2, lambda s, r: s + r <= 4, lambda s, r: 10.0 - s - 2 * r, compressed=True
    )
    assert choice.kind == "compressed" and (choice.slots, choice.resident) == (2, 2)


def test_experts_go_to_disk_when_host_memory_is_short():
    blocks = [replace(b, on_disk=True) for b in small()]
    o = PlanOptions(device_bytes=60 * MB, host_bytes=40 * MB, disk=True, speculate=False)
    plan = make_plan(blocks, o)
    assert DISK in plan.tiers and plan.host_bytes <= o.host_bytes
    on_disk = [b for b, t in zip(plan.blocks, plan.tiers, strict=True) if t == DISK]
    assert all(b.routed for b in on_disk)  # used a quarter as often: they go first
    miss = 1 - plan.expert_hit_rate
    assert plan.disk_bytes_per_forward == round(
        sum(b.uses * b.compressed_bytes for b in on_disk) * miss
    )


def test_plans_without_experts_print_per_forward():
    blocks = [BlockSpec(f"layer{i}", 5 * MB, 10 * MB, 7 * MB) for i in range(10)]
    plan = make_plan(blocks, PlanOptions(device_bytes=60 * MB, host_bytes=10**10))
    assert plan.expert_groups == () and plan.expert_cache == "" and plan.expert_slots == 0
    text = str(plan)
    assert "per forward:" in text and "experts:" not in text and "expert slots" not in text


@pytest.mark.parametrize("copies", [True, False])
def test_more_budget_never_raises_the_bound(copies):
    prev = None
    for mb in range(80, 300, 5):
        o = PlanOptions(device_bytes=mb * MB, host_bytes=10**10, pcie_gbps=1, copies=copies)
        plan = make_plan(small(), o)
        assert plan.gpu_bytes <= o.device_bytes
        if prev is not None:
            assert plan.seconds_bound() <= prev
        prev = plan.seconds_bound()
