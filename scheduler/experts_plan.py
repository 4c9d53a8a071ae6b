"""The expert cache of a mixture-of-experts plan: the routing model, pool hit rates, and the
choice between caching experts decoded or compressed.

Part of the planner (pure: sizes in, numbers out), beside plan.py, which calls it. A routed block
is one expert of one MoE layer; ``BlockSpec.routed`` names the layer, the expert's *group*. The
executor enters it only when the router picks it, so what it costs per token is an expectation.
The model the planner prices it by:

- Routing is uniform and independent: every token picks ``top_k`` of the ``E`` experts of each
  group, so an expert has ``uses = top_k / E`` expected uses per token, and a group's top_k is
  round(uses x E) (the sum of its members' uses).
- Each group keeps an LRU pool of P >= 0 decoded slots. Under uniform routing any expert is as
  likely as another to be in it, so a routed use finds its expert decoded with probability
  min(P, E) / E: no copy and no decode then. Beside the pools, a few working slots shared by all
  layers (shared_slots) hold the expert running now and the next layer's guesses; their hits
  are not counted (the model errs low).
- An expert resident compressed on the device (tier device-compressed) needs no copy on a miss,
  only a decode.

With the bytes the regular blocks leave, the cache is either "decoded" (more slots per group,
evenly, up to E) or "compressed" (c experts resident compressed, dealt round-robin over the
groups: every group's first, then its second ...); the one whose plan has the smaller time
bound wins (decoded on ties), and room left after it is spent on the other where that lowers
the bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neuzip_offload.budget import format_size

from .tiers import DEVICE, DEVICE_COMPRESSED, TIERS

if TYPE_CHECKING:
    from .plan import BlockSpec, Plan

DECODED = "decoded"
COMPRESSED = "compressed"


@dataclass(frozen=True)
class ExpertGroup:
    """The experts of one MoE layer: their block indices in expert order and top_k per token."""

    name: str
    members: tuple[int, ...]
    top_k: int

    @property
    def experts(self) -> int:
        return len(self.members)

    @property
    def label(self) -> str:
        """The group's row name in a printed plan, e.g. ``model.layers.3.mlp.experts[0..7]``."""
        return f"{self.name}[0..{self.experts - 1}]"

    def hit_rate(self, slots: int) -> float:
        """Chance that a routed use finds its expert in an LRU pool of ``slots`` decoded slots
        under uniform routing: min(P, E) / E."""
        return min(slots, self.experts) / self.experts


@dataclass(frozen=True)
class CacheChoice:
    """Decoded slots per group, experts resident compressed per group, and which one leads."""

    slots: int
    resident: int
    kind: str


def expert_groups(blocks: Sequence[BlockSpec]) -> tuple[ExpertGroup, ...]:
    """The groups of the routed blocks, in the order their first expert appears."""
    members: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        if b.routed is not None:
            members.setdefault(b.routed, []).append(i)
    groups = []
    for name, indices in members.items():
        top_k = round(sum(blocks[i].uses for i in indices))
        groups.append(ExpertGroup(name, tuple(indices), max(1, min(len(indices), top_k))))
    return tuple(groups)


def shared_slots(groups: Sequence[ExpertGroup], speculate: bool) -> int:
    """Working slots all MoE layers share beside their pools: one for the expert running now,
    plus, when prefetching speculatively, room for the next layer's top_k guesses (so that a
    guess is never evicted by the layer that made it). A pool of P = 0 then still works."""
    if not groups:
        return 0
    return 1 + (max(g.top_k for g in groups) if speculate else 0)


def pool_slots(groups: Sequence[ExpertGroup], slots: int, speculate: bool) -> int:
    """Decoded expert slots in all: the pools (``slots`` each, at most its E) and the shared
    working slots."""
    return sum(min(slots, g.experts) for g in groups) + shared_slots(groups, speculate)


def minimum_slots(groups: Sequence[ExpertGroup], speculate: bool) -> int:
    """The smallest pool per layer: none (the shared working slots serve every layer)."""
    return 0


def resident_experts(groups: Sequence[ExpertGroup], count: int) -> list[int]:
    """Block indices of ``count`` experts resident compressed, dealt round-robin: the first
    expert of every group, then the second ..., so groups differ by at most one and no room
    is left that a whole round would not fill."""
    rounds = max((g.experts for g in groups), default=0)
    dealt = [g.members[j] for j in range(rounds) for g in groups if j < g.experts]
    return dealt[:count]


def hit_rates(
    groups: Sequence[ExpertGroup], slots: int, tiers: Sequence[str]
) -> tuple[tuple[float, float], ...]:
    """Per block, the expected shares of its uses that need (no decode, no copy): a routed
    block's pool hit rate, or 1 where its tier saves that outright; 0 for a regular block."""
    rates = [(0.0, 0.0)] * len(tiers)
    for g in groups:
        hit = g.hit_rate(slots)
        for i in g.members:
            rates[i] = (
                1.0 if tiers[i] == DEVICE else hit,
                1.0 if tiers[i] in (DEVICE, DEVICE_COMPRESSED) else hit,
            )
    return tuple(rates)


def routed_share(
    blocks: Sequence[BlockSpec],
    groups: Sequence[ExpertGroup],
    rates: Sequence[tuple[float, float]],
    which: int,
) -> float:
    """The uses-weighted mean over routed blocks of their ``rates[which]`` (0: decoded hits,
    1: copy-free uses); 0 without routed blocks."""
    routed = [i for g in groups for i in g.members]
    total = sum(blocks[i].uses for i in routed)
    return sum(blocks[i].uses * rates[i][which] for i in routed) / total if total else 0.0


def slot_bytes(blocks: Sequence[BlockSpec], tiers: Sequence[str]) -> int:
    """A pool slot holds the largest routed block not resident decoded."""
    streamed = zip(blocks, tiers, strict=True)
    return max(
        (b.decoded_bytes for b, t in streamed if b.routed is not None and t != DEVICE), default=0
    )


def group_row(
    group: ExpertGroup, blocks: Sequence[BlockSpec], tiers: Sequence[str]
) -> tuple[str, int, int, int, str]:
    """A MoE layer's row of a printed plan: its experts' sums and how many sit in each tier
    (e.g. "3 device-compressed + 5 host")."""
    experts = [blocks[i] for i in group.members]
    where = [tiers[i] for i in group.members]
    return (
        group.label,
        sum(e.params for e in experts),
        sum(e.decoded_bytes for e in experts),
        sum(e.compressed_bytes for e in experts),
        " + ".join(f"{where.count(t)} {t}" for t in TIERS if t in where),
    )


def describe(plan: Plan) -> str:
    """The MoE line of a printed plan: experts, routing, the cache and its expected hit rates."""
    groups = plan.expert_groups
    shapes = sorted({(g.top_k, g.experts) for g in groups})
    cache = "none"
    if plan.expert_cache:
        slots = f"{plan.expert_slots} slot{'s' * (plan.expert_slots != 1)}"
        cache = f"{plan.expert_cache}, {slots} per group of {format_size(plan.expert_slot_bytes)}"
        resident = sum(plan.tiers[i] == DEVICE_COMPRESSED for g in groups for i in g.members)
        if resident:
            cache += f", {resident} experts resident compressed"
        cache += f"; {plan.expert_shared_slots} working slots shared"
    return (
        f"experts: {sum(g.experts for g in groups)} in {len(groups)} groups, "
        f"{', '.join(f'top-{k} of {e}' for k, e in shapes)} per token; cache: {cache} "
        f"(expected hit rate {plan.expert_hit_rate:.1%}, copy-free "
        f"{plan.expert_copy_hit_rate:.1%})"
    )


def choose_cache(
    groups: Sequence[ExpertGroup],
    slots_min: int,
    fits: Callable[[int, int], bool],
    bound: Callable[[int, int], float],
    compressed: bool,
) -> CacheChoice:
    """The expert cache with the smaller time bound.

    ``fits(slots, resident)`` says whether a plan with that many decoded slots per group and
    experts resident compressed in all (resident_experts) fits the device
    (``fits(slots_min, 0)`` must hold);
    ``bound(slots, resident)`` is that plan's seconds_bound. ``compressed``: residency of
    compressed experts is possible and pays (blocks are copied, weights keep their size).
    """
    most = max(g.experts for g in groups)
    most_resident = sum(g.experts for g in groups)

    def more_slots(slots: int, resident: int) -> int:
        more = _furthest(lambda p: fits(p, resident), slots, most)
        return more if bound(more, resident) < bound(slots, resident) else slots

    def more_resident(slots: int, resident: int) -> int:
        if not compressed:
            return resident
        more = _furthest(lambda c: fits(slots, c), resident, most_resident)
        return more if bound(slots, more) < bound(slots, resident) else resident

    # decoded: as many slots as fit, then the room left on residents
    slots = _furthest(lambda p: fits(p, 0), slots_min, most)
    choices = [CacheChoice(slots, more_resident(slots, 0), DECODED)]
    if compressed:  # compressed: as many residents as fit beside the smallest pools, then slots
        resident = _furthest(lambda c: fits(slots_min, c), 0, most_resident)
        choices.append(CacheChoice(more_slots(slots_min, resident), resident, COMPRESSED))
    # min keeps the first of equals: decoded on ties
    return min(choices, key=lambda c: bound(c.slots, c.resident))


def _furthest(ok: Callable[[int], bool], start: int, stop: int) -> int:
    """A large value in [start, stop] that ``ok`` accepts, by bisection: device bytes grow with
    slots and residents (but for staging that shrinks once no expert is left on the host, which
    bisection may miss); ``start`` is taken as accepted, any other value returned was."""
    lo, hi = start, stop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
