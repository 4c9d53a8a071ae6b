"""The planner: a pure function from block sizes and budgets to a frozen, printable Plan.

Each block goes to one of the tiers of tiers.py (device, device-compressed, host, disk).

Everything the runtime allocates on the device counts against ``device_bytes``: uncompressed
parameters (norms, biases, buffers), resident blocks, ``prefetch + 1`` slots for decoded blocks,
the expert pools, staging buffers for compressed blocks in flight, one decode workspace, and a
reserve for activations and KV cache.

Assignment is greedy on a cost model of time per forward: moving a block host → device-compressed
saves its copy (compressed bytes at ``pcie_gbps``); host → device also saves its decode (decoded
bytes at ``decode_gbps``). Moves are taken best gain per byte first while they fit. Without copies
(the CPU backend, where host and device are one memory) only decoded residency pays.

Mixture-of-experts: a routed block (one expert; ``BlockSpec.routed`` names its MoE layer) is
entered only when the router picks it, from a pool of ``expert_slots`` decoded slots its layer
keeps; the regular slots serve the other blocks. Its per-forward costs are expectations under
uniform routing, and "per forward" means per token of a decode step for such a plan. The greedy
above places the regular blocks; what they leave goes to the expert cache (experts_plan.py has
the model and the choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

from neuzip_offload.budget import format_size

from . import experts_plan as experts
from .tiers import DEVICE, DEVICE_COMPRESSED, DISK, HOST, TIERS


class PlanError(ValueError):
    """No placement fits the budgets. ``minimum_device_bytes`` is the smallest that would."""

    def __init__(self, message: str, minimum_device_bytes: int | None = None):
        super().__init__(message)
        self.minimum_device_bytes = minimum_device_bytes


@dataclass(frozen=True)
class BlockSpec:
    """What the planner knows of one block: sizes only."""

    name: str
    params: int
    decoded_bytes: int  # bytes it takes in a slot (or resident), entries aligned
    compressed_bytes: int  # planes and headers, as packed for one copy
    workspace_bytes: int = 0  # scratch its decode needs on the device
    # expected uses per forward (a tied embedding / lm_head: 2; an expert routed top_k of E: k/E)
    uses: float = 1
    stored_bytes: int | None = None  # the format's size (no alignment padding); for reports
    on_disk: bool = False  # its bytes are in a file it can be read from (a disk tier is possible)
    # device bytes its setup holds for a moment if it is made resident decoded: the compressed
    # planes of its largest tensor while they decode (only where blocks are copied to a device)
    setup_bytes: int = 0
    # the MoE layer (its experts module) this block is one expert of; None: not routed
    routed: str | None = None


@dataclass(frozen=True)
class PlanOptions:
    device_bytes: int
    host_bytes: int
    reserve_bytes: int = 0
    resident_bytes: int = 0  # uncompressed parameters and buffers on the device
    prefetch: int = 2
    copies: bool = True  # False: host and device are the same memory (the CPU backend)
    pcie_gbps: float = 25.0
    decode_gbps: float = 70.0  # device decode rate (api.py measures it on CUDA)
    decode_source: str = ""  # how decode_gbps was obtained, for the printed plan
    device: str = "cuda"
    disk: bool = False  # blocks can be read from their files: a disk tier exists
    device_compressed: bool = True  # False when training: re-encoded weights change size
    disk_gbps: float = 3.0
    # disk blocks read this many blocks beyond prefetch (None: = prefetch)
    read_ahead: int | None = None
    # device bytes for transient work beside the slots while the model runs (training's
    # re-encoding of an updated weight): held apart from the reserve, which activations use then
    scratch_bytes: int = 0
    # mixture-of-experts: fetch the next layer's likely experts ahead, so each pool holds top_k
    speculate: bool = True

    @property
    def disk_staging_count(self) -> int:
        """Pinned host buffers the background reader fills (prefetch + read-ahead, at least 1)."""
        ahead = self.prefetch if self.read_ahead is None else self.read_ahead
        return max(1, self.prefetch + ahead)

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        for name in (
            "device_bytes",
            "host_bytes",
            "reserve_bytes",
            "resident_bytes",
            "scratch_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.pcie_gbps <= 0 or self.decode_gbps <= 0 or self.disk_gbps <= 0:
            raise ValueError("pcie_gbps, decode_gbps and disk_gbps must be positive")


@dataclass(frozen=True)
class Plan:
    blocks: tuple[BlockSpec, ...]
    tiers: tuple[str, ...]
    options: PlanOptions
    n_slots: int = 0
    slot_bytes: int = 0
    n_staging: int = 0
    staging_bytes: int = 0
    workspace_bytes: int = 0
    n_disk_staging: int = 0
    disk_staging_bytes: int = 0
    expert_slots: int = 0  # decoded slots per MoE layer's pool (at most its number of experts)
    expert_slot_bytes: int = 0
    expert_cache: str = ""  # "decoded", "compressed", or "" (no routed blocks, or all resident)
    notes: tuple[str, ...] = field(default_factory=tuple)

    # -- totals ------------------------------------------------------------------------------
    def _sum(self, what: str, tiers: tuple[str, ...]) -> int:
        return sum(
            getattr(b, what) for b, t in zip(self.blocks, self.tiers, strict=True) if t in tiers
        )

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def decoded_bytes(self) -> int:
        return sum(b.decoded_bytes for b in self.blocks)

    @property
    def compressed_bytes(self) -> int:
        return sum(b.compressed_bytes for b in self.blocks)

    @property
    def stored_bytes(self) -> int:
        return sum(
            b.compressed_bytes if b.stored_bytes is None else b.stored_bytes for b in self.blocks
        )

    @property
    def bits_per_weight(self) -> float:
        """Compressed bits per compressed weight, every plane and header included."""
        return 8 * self.stored_bytes / self.params if self.params else math.inf

    @property
    def buffer_bytes(self) -> int:
        """Slots, expert pools, staging and workspace: what streaming costs on the device."""
        return (
            self.n_slots * self.slot_bytes
            + self.expert_pool_slots * self.expert_slot_bytes
            + self.n_staging * self.staging_bytes
            + self.workspace_bytes
        )

    # -- experts -----------------------------------------------------------------------------
    @cached_property
    def expert_groups(self) -> tuple[experts.ExpertGroup, ...]:
        """The MoE layers: each one's routed blocks (indices into ``blocks``) and top_k."""
        return experts.expert_groups(self.blocks)

    @property
    def expert_pool_slots(self) -> int:
        """Decoded expert slots of all the pools together."""
        return experts.pool_slots(self.expert_groups, self.expert_slots, self.options.speculate)

    @property
    def expert_shared_slots(self) -> int:
        """Working expert slots shared by all MoE layers (part of expert_pool_slots)."""
        return experts.shared_slots(self.expert_groups, self.options.speculate)

    @cached_property
    def _hit_rates(self) -> tuple[tuple[float, float], ...]:
        return experts.hit_rates(self.expert_groups, self.expert_slots, self.tiers)

    @property
    def expert_hit_rate(self) -> float:
        """Expected share of routed uses whose expert is already decoded (in its layer's pool,
        or resident decoded): min(P, E)/E under uniform routing. 0 without routed blocks."""
        return experts.routed_share(self.blocks, self.expert_groups, self._hit_rates, 0)

    @property
    def expert_copy_hit_rate(self) -> float:
        """Expected share of routed uses that need no copy: a decoded hit, or an expert resident
        on the device (compressed or not). 0 without routed blocks."""
        return experts.routed_share(self.blocks, self.expert_groups, self._hit_rates, 1)

    def _per_forward(self, size: str, tiers: tuple[str, ...], saved_by: int) -> int:
        """uses x size summed over the blocks in ``tiers``, each routed one's share the cache
        saves (``saved_by``: 0 decoded hits, 1 copy-free uses) taken off."""
        return round(
            sum(
                b.uses * getattr(b, size) * (1 - rates[saved_by])
                for b, t, rates in zip(self.blocks, self.tiers, self._hit_rates, strict=True)
                if t in tiers
            )
        )

    @property
    def transient_bytes(self) -> int:
        """Device bytes kept free beside the reserve for transient work (see _transient)."""
        return _transient(self.blocks, self.tiers, self.options)

    @property
    def gpu_bytes(self) -> int:
        """Device bytes the runtime holds or keeps free for its own transient work (the reserve
        for activations not included)."""
        return (
            self.options.resident_bytes
            + self._sum("decoded_bytes", (DEVICE,))
            + self._sum("compressed_bytes", (DEVICE_COMPRESSED,))
            + self.buffer_bytes
            + self.transient_bytes
        )

    @property
    def host_bytes(self) -> int:
        """Host bytes: blocks in host memory plus the disk reader's pinned staging buffers."""
        staging = self.n_disk_staging * self.disk_staging_bytes
        return self._sum("compressed_bytes", (HOST,)) + staging

    @property
    def disk_bytes(self) -> int:
        return self._sum("compressed_bytes", (DISK,))

    @property
    def pcie_bytes_per_forward(self) -> int:
        """Bytes copied host → device per forward (per token with routed blocks: expected, after
        the expert cache's copy-free hits); 0 on the CPU backend."""
        if not self.options.copies:
            return 0
        return self._per_forward("compressed_bytes", (HOST, DISK), 1)

    @property
    def disk_bytes_per_forward(self) -> int:
        """Bytes read from disk per forward (per token with routed blocks, as PCIe); from the
        page cache when it holds them."""
        return self._per_forward("compressed_bytes", (DISK,), 1)

    @property
    def decoded_bytes_per_forward(self) -> int:
        """Bytes decoded per forward (per token with routed blocks, after decoded hits)."""
        return self._per_forward("decoded_bytes", (DEVICE_COMPRESSED, HOST, DISK), 0)

    def seconds_lower_bound(
        self, pcie_gbps: float | None = None, disk_gbps: float | None = None
    ) -> float:
        """Time per forward (per token with routed blocks) the transfers alone take: the slower
        of PCIe and disk (they overlap)."""
        pcie = self.pcie_bytes_per_forward / ((pcie_gbps or self.options.pcie_gbps) * 1e9)
        disk = self.disk_bytes_per_forward / ((disk_gbps or self.options.disk_gbps) * 1e9)
        return max(pcie, disk)

    def seconds_decoding(self) -> float:
        """Time per forward (per token with routed blocks) decoding alone takes at the plan's
        decode rate."""
        return self.decoded_bytes_per_forward / (self.options.decode_gbps * 1e9)

    def seconds_bound(self) -> float:
        """Time per forward (per token with routed blocks, in expectation) no schedule beats:
        transfers and decoding overlap each other (and compute), so the slowest of them."""
        return max(self.seconds_lower_bound(), self.seconds_decoding())

    def _bound_terms(self) -> str:
        """The terms of seconds_bound, for the table: what each takes at which rate."""
        o = self.options
        terms = [f"decoding {self.seconds_decoding() * 1e3:.2f} ms at {o.decode_gbps:.1f} GB/s"]
        if o.copies:
            pcie = self.pcie_bytes_per_forward / (o.pcie_gbps * 1e9)
            terms.append(f"PCIe {pcie * 1e3:.2f} ms at {o.pcie_gbps:g} GB/s")
        if o.disk:
            disk = self.disk_bytes_per_forward / (o.disk_gbps * 1e9)
            terms.append(f"disk {disk * 1e3:.2f} ms at {o.disk_gbps:g} GB/s")
        return ", ".join(terms)

    def tier_of(self, name: str) -> str:
        for b, t in zip(self.blocks, self.tiers, strict=True):
            if b.name == name:
                return t
        raise KeyError(name)

    # -- printing ----------------------------------------------------------------------------
    def _rows(self) -> list[tuple[str, int, int, int, str]]:
        """(name, params, decoded, compressed, tier) per regular block, and one row per MoE layer
        at its first expert."""
        first = {g.members[0]: g for g in self.expert_groups}
        return [
            (b.name, b.params, b.decoded_bytes, b.compressed_bytes, t)
            if b.routed is None
            else experts.group_row(first[i], self.blocks, self.tiers)
            for i, (b, t) in enumerate(zip(self.blocks, self.tiers, strict=True))
            if b.routed is None or i in first
        ]

    def table(self) -> str:
        o = self.options
        rows = self._rows()
        w = max([len(r[0]) for r in rows] + [5])
        lines = [
            f"{'block':<{w}}  {'params':>9}  {'decoded':>11}  {'compressed':>11}  tier",
            "-" * (w + 52),
        ]
        for name, params, decoded, compressed, tier in rows:
            lines.append(
                f"{name:<{w}}  {_count(params):>9}  {format_size(decoded):>11}  "
                f"{format_size(compressed):>11}  {tier}"
            )
        lines.append("-" * (w + 52))
        lines.append(
            f"{'total':<{w}}  {_count(self.params):>9}  {format_size(self.decoded_bytes):>11}  "
            f"{format_size(self.compressed_bytes):>11}  {self.bits_per_weight:.3f} bits/weight"
        )
        counts = {t: self.tiers.count(t) for t in TIERS}
        pools = self.expert_pool_slots
        pools = f"expert slots {pools} x {format_size(self.expert_slot_bytes)}, " if pools else ""
        lines.append(
            f"blocks: {counts[DEVICE]} device, {counts[DEVICE_COMPRESSED]} device-compressed, "
            f"{counts[HOST]} host, {counts[DISK]} disk"
        )
        if self.expert_groups:
            lines.append(experts.describe(self))
        lines += [
            f"device ({o.device}): {format_size(self.gpu_bytes + o.reserve_bytes)} of "
            f"{format_size(o.device_bytes)} — uncompressed params {format_size(o.resident_bytes)}"
            f", resident {format_size(self._sum('decoded_bytes', (DEVICE,)))} decoded + "
            f"{format_size(self._sum('compressed_bytes', (DEVICE_COMPRESSED,)))} compressed, "
            f"slots {self.n_slots} x {format_size(self.slot_bytes)}, {pools}"
            f"staging {self.n_staging} x {format_size(self.staging_bytes)}, "
            f"workspace {format_size(self.workspace_bytes)}, "
            f"transient {format_size(self.transient_bytes)}, "
            f"reserve {format_size(o.reserve_bytes)}",
            f"host: {format_size(self.host_bytes)} of {format_size(o.host_bytes)} (disk reader "
            f"staging {self.n_disk_staging} x {format_size(self.disk_staging_bytes)}); disk: "
            f"{format_size(self.disk_bytes)}",
            f"per {'token' if self.expert_groups else 'forward'}: "
            f"{format_size(self.pcie_bytes_per_forward)} over PCIe, "
            f"{format_size(self.disk_bytes_per_forward)} from disk, "
            f"{format_size(self.decoded_bytes_per_forward)} decoded; lower bound "
            f"{self.seconds_bound() * 1e3:.2f} ms ({self._bound_terms()})",
            f"decode rate: {o.decode_gbps:.1f} GB/s ({o.decode_source or 'given'})",
        ]
        lines += list(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _count(n: int) -> str:
    for unit, f in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= f:
            return f"{n / f:.2f}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------
# the planner
# ---------------------------------------------------------------------------------------------


def _buffers(blocks, tiers, o: PlanOptions) -> tuple[int, int, int, int, int]:
    """(n_slots, slot_bytes, n_staging, staging_bytes, workspace) for an assignment. The slots
    serve the regular blocks (experts have their pools); staging and workspace serve all."""
    streamed = [b for b, t in zip(blocks, tiers, strict=True) if t != DEVICE]
    if not streamed:
        return 0, 0, 0, 0, 0
    regular = [b.decoded_bytes for b in streamed if b.routed is None]
    workspace = max(b.workspace_bytes for b in streamed)
    hosted = [b for b, t in zip(blocks, tiers, strict=True) if t in (HOST, DISK)]
    n_staging = max(1, o.prefetch) if (hosted and o.copies) else 0
    staging = max((b.compressed_bytes for b in hosted), default=0) if n_staging else 0
    n_slots = o.prefetch + 1 if regular else 0
    return n_slots, max(regular, default=0), n_staging, staging, workspace


def _setup_peak(blocks, tiers, o: PlanOptions) -> int:
    """The largest setup transient among the blocks made resident decoded."""
    if not o.copies:
        return 0
    resident = (b.setup_bytes for b, t in zip(blocks, tiers, strict=True) if t == DEVICE)
    return max(resident, default=0)


def _transient(blocks, tiers, o: PlanOptions, setup: int | None = None) -> int:
    """Device bytes beyond the reserve for transient work: training's scratch while the model
    runs, or at setup the compressed planes of a tensor decoding into residence. The reserve is
    still unused at setup, so only the part of the setup copy beyond it counts."""
    setup = _setup_peak(blocks, tiers, o) if setup is None else setup
    return max(o.scratch_bytes, setup - o.reserve_bytes, 0)


def _device_total(blocks, tiers, o: PlanOptions, groups=(), expert_slots: int = 0) -> int:
    """Device bytes of an assignment with ``expert_slots`` per pool of the MoE ``groups``."""
    n_slots, slot, n_staging, staging, workspace = _buffers(blocks, tiers, o)
    n_pool = experts.pool_slots(groups, expert_slots, o.speculate)
    pools = n_pool * experts.slot_bytes(blocks, tiers)
    resident = sum(
        b.decoded_bytes if t == DEVICE else b.compressed_bytes if t == DEVICE_COMPRESSED else 0
        for b, t in zip(blocks, tiers, strict=True)
    )
    return (
        o.reserve_bytes
        + o.resident_bytes
        + resident
        + n_slots * slot
        + pools
        + n_staging * staging
        + workspace
        + _transient(blocks, tiers, o)
    )


def make_plan(blocks: list[BlockSpec] | tuple[BlockSpec, ...], options: PlanOptions) -> Plan:
    """Place every block in a tier within the budgets; raise PlanError when none fits.

    Routed blocks start on the host with the smallest expert pools; the regular blocks are
    placed among themselves, and the expert cache gets what they leave (_expert_cache).
    """
    blocks = tuple(blocks)
    o = options
    all_device = (DEVICE,) * len(blocks)
    if _device_total(blocks, all_device, o) <= o.device_bytes:
        return Plan(blocks, all_device, o, notes=("everything fits decoded on the device",))
    groups = experts.expert_groups(blocks)
    slots_min = experts.minimum_slots(groups, o.speculate)
    regular = [i for i, b in enumerate(blocks) if b.routed is None]

    # Start from everything on the host, or, when the slots for the largest blocks do not fit,
    # from the k largest blocks resident (which shrinks the slots) for the smallest such k
    # (with experts streaming, k may be every regular block).
    by_size = sorted(regular, key=lambda i: -blocks[i].decoded_bytes)
    tiers, floor = None, None
    for k in range(len(regular) + (1 if groups else 0)):
        trial = [HOST] * len(blocks)
        for i in by_size[:k]:
            trial[i] = DEVICE
        total = _device_total(blocks, trial, o, groups, slots_min)
        floor = total if floor is None else min(floor, total)
        if total <= o.device_bytes:
            tiers = trial
            break
    if tiers is None:
        streams = []
        if regular:
            largest = max(blocks[i].decoded_bytes for i in regular)
            streams.append(
                f"the largest block ({format_size(largest)} decoded) through {o.prefetch + 1} slots"
            )
        if groups:
            expert = format_size(experts.slot_bytes(blocks, [HOST] * len(blocks)))
            n = experts.pool_slots(groups, slots_min, o.speculate)
            streams.append(f"{n} expert slots of {expert}")
        raise PlanError(
            f"max_gpu_mem={format_size(o.device_bytes)} is too small: streaming "
            f"{' and '.join(streams)}, with the uncompressed parameters "
            f"({format_size(o.resident_bytes)}) and the reserve ({format_size(o.reserve_bytes)}), "
            f"needs at least {format_size(floor)} ({floor} bytes); raise the budget, lower "
            "prefetch or the reserve",
            minimum_device_bytes=floor,
        )
    copy_s = [
        b.uses * b.compressed_bytes / (o.pcie_gbps * 1e9) if o.copies else 0.0 for b in blocks
    ]
    decode_s = [b.uses * b.decoded_bytes / (o.decode_gbps * 1e9) for b in blocks]
    # Passes of greedy moves, best saving per byte first. Within a pass the buffers keep their
    # sizes (moves can only shrink them); the next pass spends what shrinking freed.
    while True:
        left = o.device_bytes - _device_total(blocks, tiers, o, groups, slots_min)
        setup = _setup_peak(blocks, tiers, o)
        moves = []
        for i, (b, t) in enumerate(zip(blocks, tiers, strict=True)):
            if b.routed is not None:
                continue
            if t == HOST:
                if copy_s[i] > 0 and o.device_compressed:
                    moves.append(
                        (
                            copy_s[i] / max(b.compressed_bytes, 1),
                            i,
                            HOST,
                            DEVICE_COMPRESSED,
                            b.compressed_bytes,
                        )
                    )
                moves.append(
                    (
                        (copy_s[i] + decode_s[i]) / max(b.decoded_bytes, 1),
                        i,
                        HOST,
                        DEVICE,
                        b.decoded_bytes,
                    )
                )
            elif t == DEVICE_COMPRESSED and decode_s[i] > 0:
                extra = max(b.decoded_bytes - b.compressed_bytes, 1)
                moves.append((decode_s[i] / extra, i, DEVICE_COMPRESSED, DEVICE, extra))
        moved = False
        for _, i, source, target, cost in sorted(moves, key=lambda m: (-m[0], m[1])):
            grown = setup
            if target == DEVICE and o.copies:  # its setup copy may raise the transient peak
                grown = max(setup, blocks[i].setup_bytes)
                cost += _transient(blocks, tiers, o, grown) - _transient(blocks, tiers, o, setup)
            if tiers[i] == source and cost <= left:
                tiers[i] = target
                left -= cost
                setup = grown
                moved = True
        if not moved:
            break
    slots, cache = 0, ""
    if groups:
        tiers, slots, cache = _expert_cache(blocks, tiers, o, groups, slots_min)
    tiers, n_disk, disk_staging = _host_or_disk(blocks, tiers, o)
    buffers, pool = _buffers(blocks, tiers, o), experts.slot_bytes(blocks, tiers)
    return Plan(blocks, tuple(tiers), o, *buffers, n_disk, disk_staging, slots, pool, cache)


def _expert_cache(
    blocks, tiers, o: PlanOptions, groups: tuple[experts.ExpertGroup, ...], slots_min: int
) -> tuple[list[str], int, str]:
    """(tiers, expert slots per pool, cache kind): the cache of the smaller bound that fits
    beside the regular blocks as placed (experts_plan.choose_cache)."""

    def placed(resident: int) -> list[str]:
        trial = list(tiers)
        for i in experts.resident_experts(groups, resident):
            trial[i] = DEVICE_COMPRESSED
        return trial

    def fits(slots: int, resident: int) -> bool:
        return _device_total(blocks, placed(resident), o, groups, slots) <= o.device_bytes

    def bound(slots: int, resident: int) -> float:
        return Plan(blocks, tuple(placed(resident)), o, expert_slots=slots).seconds_bound()

    # compressed residency saves copies only: none without them, and training re-encodes
    choice = experts.choose_cache(groups, slots_min, fits, bound, o.copies and o.device_compressed)
    return placed(choice.resident), choice.slots, choice.kind


def _host_or_disk(blocks, tiers, o: PlanOptions) -> tuple[list[str], int, int]:
    """Blocks not on the device stay in host memory while it lasts, the rest on disk.

    The disk reader's staging buffers are as large as the largest block on disk, so each
    candidate staging size is tried: blocks above it must stay in memory, the rest fill what
    memory is left, most-used first; the choice that reads the least from disk wins.
    """
    off = [i for i, t in enumerate(tiers) if t == HOST]
    need = sum(blocks[i].compressed_bytes for i in off)
    if need <= o.host_bytes:
        return tiers, 0, 0
    if not o.disk:
        raise PlanError(
            f"max_cpu_mem={format_size(o.host_bytes)} is too small for the "
            f"{format_size(need)} of compressed blocks that do not fit on the device (from a "
            "checkpoint on disk, neuzip_offload.load, the rest could stay on disk)"
        )
    n_stage = o.disk_staging_count
    best = None
    for stage in sorted({blocks[i].compressed_bytes for i in off if blocks[i].on_disk}):
        must = [i for i in off if blocks[i].compressed_bytes > stage or not blocks[i].on_disk]
        left = o.host_bytes - n_stage * stage - sum(blocks[i].compressed_bytes for i in must)
        if left < 0:
            continue
        trial = list(tiers)
        rest = sorted((i for i in off if i not in must), key=lambda i: (-blocks[i].uses, i))
        for i in rest:
            if blocks[i].compressed_bytes <= left:
                left -= blocks[i].compressed_bytes
            else:
                trial[i] = DISK
        disk = sum(
            b.uses * b.compressed_bytes for b, t in zip(blocks, trial, strict=True) if t == DISK
        )
        if best is None or disk < best[0]:
            best = (disk, trial)
    if best is None:
        smallest = min(blocks[i].compressed_bytes for i in off)
        raise PlanError(
            f"max_cpu_mem={format_size(o.host_bytes)} is too small: the disk reader's {n_stage} "
            "staging buffers must hold the largest block it reads (at least "
            f"{format_size(smallest)}) and every larger block must then fit in memory beside them"
        )
    tiers = best[1]
    disk = [i for i, t in enumerate(tiers) if t == DISK]
    stage = max(blocks[i].compressed_bytes for i in disk) if disk else 0
    return tiers, (n_stage if disk else 0), stage


def with_options(plan: Plan, **changes) -> Plan:
    """The same blocks planned again under changed options."""
    return make_plan(plan.blocks, replace(plan.options, **changes))
