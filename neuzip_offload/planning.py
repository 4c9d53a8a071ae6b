"""The plan of a dispatch: planner options from the user's options, estimated plans before
compressing, and the plan the executor runs.

Third step of the data path: blocks (blocks.py) → plan (scheduler/plan.py, a pure function) →
executor. Before anything is compressed, an *estimated* plan (compressed sizes from bits per
weight) picks the granularity (whole layers, else their parts, else single matrices) and
refuses a budget no compression could meet; after compressing, the plan is made from the
measured blocks, and on CUDA again with the decode rate timed on the largest block.

Lossless, the blocks the plan keeps decoded on the device need not be encoded at all (they
would be decoded straight back): before compressing, a plan from stand-ins (sizing.py: every
size exact but the coded exponents, estimated from their histogram) names them, and only the
rest is encoded. The plan the executor runs is then made from the measured blocks and those
stand-ins; a stand-in's compressed size counts nowhere once its block is resident decoded, so
that plan's accounting is exact. Should it still stream one of those blocks (the estimates
were off), dispatch encodes them after all and plans as if it had from the start.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from . import blocks as block_builder
from . import budget, calibrate, sizing
from .compressed import CompressedTensor
from .kernels import planes
from .model_analysis import Weight, analyze, estimate_reserve, resident_bytes, warn_plain_share
from .options import GRANULARITIES, DispatchOptions
from .scheduler.plan import DEVICE, BlockSpec, Plan, PlanError, PlanOptions, make_plan
from .scheduler.store import BlockData

log = logging.getLogger(__name__)

CODED_EXPONENT_BITS = 2.65  # measured on MiniLM and SmolLM2 (BENCHMARKS.md)
INDEX_BITS = 0.03  # headers, tables and checksums per weight
SCALE_BITS = 7  # the lossy block scale, per block of ``block_size`` weights


def raw_bits(dtype: torch.dtype) -> int:
    """Bits per weight a lossless plane keeps uncoded (sign and mantissa), from the format."""
    layout = planes.lossless_layout(dtype)
    return 8 * layout.raw_bytes + layout.field_bits


def estimated_bits(
    dtype: torch.dtype, mode: str, mantissa_bits: int = 3, block_size: int = 512
) -> float:
    """Bits per weight to expect before compressing: the raw bits kept plus ~2.65 bits of coded
    exponent (measured on MiniLM and SmolLM2, BENCHMARKS.md) and the index."""
    if mode == "lossy":
        return 1 + mantissa_bits + CODED_EXPONENT_BITS + SCALE_BITS / block_size + INDEX_BITS
    return raw_bits(dtype) + CODED_EXPONENT_BITS + INDEX_BITS


def reserve_bytes(opts: DispatchOptions, model: nn.Module) -> int:
    """Device bytes kept for activations and KV cache ("auto": estimated from the config; on
    CUDA at least a tenth of the budget when the model has no config)."""
    if opts.reserve is None:
        return 0
    if opts.reserve == "auto":
        est = estimate_reserve(model)
        if est == 0 and opts.device.type == "cuda":
            est = opts.device_bytes // 10
        return est
    return opts.reserve


def training_scratch(weights: list[Weight], device: torch.device) -> int:
    """Device bytes re-encoding the largest trained piece holds (the GPU encoder), else 0."""
    if device.type != "cuda":
        return 0
    largest = [
        (w.piece_numel(a, b), w.dtype.itemsize)
        for w in weights
        if w.requires_grad
        for _, a, b in (w.pieces or [(w.key, 0, w.shape[w.kind.split_dim])])
    ]
    return max((budget.device_encode_bytes(n, s) for n, s in largest), default=0)


def plan_options(
    opts: DispatchOptions,
    model: nn.Module,
    weights: list[Weight],
    disk: bool,
    trainable: bool = False,
) -> PlanOptions:
    """The planner's options for ``model`` (whose compressed ``weights`` are not resident)."""
    dev, rate = opts.device, opts.decode_rate
    return PlanOptions(
        device_bytes=opts.device_bytes,
        host_bytes=opts.host_bytes,
        reserve_bytes=reserve_bytes(opts, model),
        resident_bytes=resident_bytes(model, weights),
        prefetch=opts.prefetch,
        speculate=opts.speculate,
        copies=dev.type == "cuda",
        pcie_gbps=opts.pcie_gbps,
        decode_gbps=rate.gbps,
        decode_source=rate.describe(dev),
        device=str(dev),
        disk=disk,
        disk_gbps=opts.disk_gbps,
        # re-encoded weights change size: no packed device copies; their encoder's scratch
        device_compressed=not trainable,
        scratch_bytes=training_scratch(weights, dev) if trainable else 0,
    )


def estimated_plan(
    opts: DispatchOptions,
    model: nn.Module,
    weights: list[Weight],
    bits: float,
    on_disk: bool,
    trainable: bool = False,
) -> Plan:
    """The plan from block sizes estimated at ``bits`` per weight (raises PlanError)."""
    specs, _ = block_builder.build(weights, opts.device, bits=bits, on_disk=on_disk)
    return make_plan(specs, plan_options(opts, model, weights, on_disk, trainable))


def analyze_at_granularity(
    opts: DispatchOptions,
    model: nn.Module,
    bits: float,
    on_disk: bool,
    trainable: bool = False,
) -> tuple[list[Weight], list[str]]:
    """(weights, roots) at the granularity asked, or for "auto" the coarsest whose estimated plan
    fits: whole layers, else their attention/MLP parts, else single matrices."""
    if opts.granularity != "auto":
        weights, roots = analyze(model, opts.max_block_bytes, opts.granularity, trainable)
        warn_plain_share(model, weights)
        return weights, roots
    for i, g in enumerate(GRANULARITIES):
        weights, roots = analyze(model, opts.max_block_bytes, g, trainable)
        if i == 0:  # the weights are the same at every granularity
            warn_plain_share(model, weights)
        try:
            estimated_plan(opts, model, weights, bits, on_disk)
            return weights, roots
        except PlanError:
            continue
    return weights, roots


def refuse_hopeless(
    opts: DispatchOptions,
    model: nn.Module,
    weights: list[Weight],
    dtype: torch.dtype,
    trainable: bool,
) -> None:
    """Raise PlanError before anything is compressed when no placement can fit: the plan is made
    with compressed sizes at their floor (the raw bits alone, exponents coded in 0 bits), so a
    budget refused here is refused by every real plan too. The error's minimum_device_bytes is
    then that of sizes at their ceiling (exponents stored whole): a budget that surely fits."""
    cfg = opts.codec
    raw = 1 + cfg.mantissa_bits if cfg.mode == "lossy" else raw_bits(dtype)
    try:
        estimated_plan(opts, model, weights, raw, False, trainable)
    except PlanError as e:
        if e.minimum_device_bytes is None:  # the host budget: nothing better to say
            raise
        try:
            estimated_plan(opts, model, weights, 1.05 * (raw + 9), False, trainable)
            enough = opts.device_bytes
        except PlanError as ceiling:
            enough = ceiling.minimum_device_bytes or e.minimum_device_bytes
        raise PlanError(
            f"{e} (refused before compressing: max_gpu_mem={enough} bytes fits whatever the "
            "weights compress to)",
            minimum_device_bytes=enough,
        ) from None


def kept_decoded(
    opts: DispatchOptions,
    model: nn.Module,
    weights: list[Weight],
    trainable: bool,
) -> dict[str, CompressedTensor]:
    """The weights a lossless plan keeps decoded on the device, which dispatch need not encode:
    piece key → stand-in (sizing.py), for every piece of every such weight. Empty when lossy
    (the lossy values are what the model runs with), or when no plan from stand-ins fits
    (the measured plan says why). A weight cut into pieces is kept only if all its pieces are:
    the executor may hold them as views of the weight's storage, all of which then stays in
    use."""
    if opts.codec.mode != "lossless" or opts.target_bits is not None:
        return {}
    pieces = {key: w.piece_of(w.param.detach(), a, b) for w in weights for key, a, b in w.pieces}
    stand_ins = {key: sizing.unencoded(t, opts.codec, key) for key, t in pieces.items()}
    specs, _ = block_builder.build(weights, opts.device, compressed=stand_ins, decoded=pieces)
    try:
        plan = make_plan(specs, plan_options(opts, model, weights, False, trainable))
    except PlanError:
        return {}
    resident = {
        key
        for g, tier in zip(block_builder.groups(weights), plan.tiers, strict=True)
        if tier == DEVICE
        for key in (m.key for m in g.members)
    }
    kept = {
        key: stand_ins[key]
        for w in weights
        if all(key in resident for key, _, _ in w.pieces)
        for key, _, _ in w.pieces
    }
    log.info("%d of %d pieces stay decoded: not encoded", len(kept), len(stand_ins))
    return kept


def unencoded_resident(plan: Plan, data: list[BlockData]) -> bool:
    """Whether the plan keeps every block that was never encoded resident decoded."""
    return all(d.decoded is None or t == DEVICE for d, t in zip(data, plan.tiers, strict=True))


def measured_plan(
    opts: DispatchOptions,
    model: nn.Module,
    weights: list[Weight],
    specs: list[BlockSpec],
    data: list[BlockData],
    trainable: bool,
) -> tuple[Plan, DispatchOptions]:
    """The plan the executor runs, from the compressed blocks (and the stand-ins of those never
    encoded); on CUDA without a given rate, made again with the decode rate timed on the
    largest encoded block. Returns the options with the rate used."""
    disk = any(d.locations is not None for d in data)
    plan = make_plan(specs, plan_options(opts, model, weights, disk, trainable))
    encoded = [(d, s) for d, s in zip(data, specs, strict=True) if d.decoded is None]
    # it fits: so does timing one block (see calibrate.py); with no block encoded, every block
    # is resident decoded and no rate matters
    if opts.device.type == "cuda" and opts.decode_rate.source == "default" and encoded:
        rate = calibrate.measured_rate(
            [d for d, _ in encoded], [s for _, s in encoded], opts.device, opts.codec
        )
        opts = replace(opts, decode_rate=rate)
        plan = make_plan(specs, plan_options(opts, model, weights, disk, trainable))
    unencoded = sum(d.decoded is not None for d in data)
    if unencoded:
        note = f"{unencoded} resident blocks never encoded: their compressed sizes are estimates"
        plan = replace(plan, notes=(*plan.notes, note))
    log.info("neuzip plan:\n%s", plan)
    return plan, opts
