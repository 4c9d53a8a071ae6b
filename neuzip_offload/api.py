"""dispatch(), load(), plan_model(), undispatch(): the data path composed, and undone.

    model = nzo.dispatch(model, max_gpu_mem="8GB")                       # lossless
    model = nzo.dispatch(model, max_gpu_mem="6GiB", mode="lossy", mantissa_bits=3)
    print(model.neuzip.plan); model.neuzip.stats
    nzo.undispatch(model)                                                # a plain model again

Each step is a file, in the order the data takes:

    options.py         the user's arguments, validated once (DispatchOptions, TrainOptions)
    model_analysis.py  the weights to compress, their blocks and pieces (HF-aware)
    planning.py        estimated plans: granularity, a hopeless budget refused early, and
                       (lossless) the weights kept decoded, which are never encoded
    encode.py          weights → CompressedTensor (or loading.py: as a checkpoint holds them)
    blocks.py          pieces → BlockSpec for the planner, BlockData for the executor
    scheduler/         the plan, then the executor that copies and decodes ahead of use
    surgery.py         modules swapped for their compressed twins (modules.py), hooks
    handle.py          model.neuzip: the one owner of the runtime's state
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import blocks as block_builder
from . import planning
from .checkpoint import Checkpoint
from .compressed import CompressedTensor
from .config import CodecConfig
from .conversion import convert
from .encode import compress_model, compress_weights
from .handle import Dispatched, PieceRecords
from .loading import (
    check_codec,
    copy_shards,
    fill_model,
    first_dtype,
    place_weights,
    stored_bits_per_weight,
    with_adapter,
)
from .mixed import check_calibration
from .model_analysis import (
    Weight,
    check_model,
    find_weights,
    model_from_config,
    tie_meta_weights,
)
from .options import DispatchError, DispatchOptions, TrainOptions
from .scheduler.executor import Executor
from .scheduler.plan import Plan
from .scheduler.store import BlockData
from .surgery import attach, release_device_originals
from .training import Trainer, return_freed_memory
from .workers import shared_pool

log = logging.getLogger(__name__)


def dispatch(
    model: nn.Module,
    max_gpu_mem: int | float | str | dict | None = None,
    *,
    mode: str = "lossless",
    mantissa_bits: int = 3,
    block_size: int = 512,
    target_bits: float | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
    max_cpu_mem: int | str | None = None,
    prefetch: int = 2,
    speculate: bool | None = None,
    reserve: int | str | None = "auto",
    device: torch.device | str | None = None,
    codec: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    offload_dir: str | os.PathLike | None = None,
    pcie_gbps: float = 25.0,
    disk_gbps: float = 3.0,
    decode_gbps: float | None = None,
    max_block_bytes: int | str | None = None,
    granularity: str = "auto",
    trainable: bool = False,
    optimizer=None,
    grad_accum_steps: int = 1,
    clip_grad_norm: float | None = None,
    clip_mode: str = "tensor",
    progress: bool = True,
    log_events: bool = True,
) -> nn.Module:
    """Compress ``model``'s weights and run it within ``max_gpu_mem``; returns the same model.

    mode: "lossless" (bit-exact) or "lossy" (``mantissa_bits`` kept after NeuZip's block
        normalization over ``block_size`` weights; or ``target_bits`` per weight on average, with
        k chosen per tensor, see neuzip_offload/mixed.py).
    max_gpu_mem / max_cpu_mem: "8GB" (10^9), "8GiB" (2^30) or bytes (8e9 too); default: what
        is free. A one-GPU dict as accelerate takes ({1: "8GB"}) runs on that GPU; several GPUs
        are not supported yet.
    prefetch: blocks copied and decoded ahead of the running one.
    speculate: mixture-of-experts models: while a MoE layer runs, the next layer's router
        applied to its input guesses the experts the next layer needs, fetched ahead (a wrong
        guess costs bandwidth, never a result). Default (None): on CUDA, where the fetch
        overlaps compute; off on the CPU, where it would not.
    reserve: device bytes kept for activations and KV cache ("auto": estimated from the config).
    device: where the model runs (default: CUDA if present, else the CPU).
    checkpoint: a Hugging Face safetensors directory to fill a model built on the meta device,
        compressing while loading (one shard in memory at a time); with ``offload_dir`` the
        compressed checkpoint is written there first (see neuzip_offload.load) so that blocks
        the host cannot hold stay on disk.
    decode_gbps: the device's decode rate for the planner (default: measured on CUDA at
        dispatch by timing the largest block, cached per device and settings).
    max_block_bytes: weights outside the layers larger than this are cut into pieces
        (default: the largest block's size).
    granularity: blocks are whole layers ("layer"), their parts ("module": attention, MLP) or
        single matrices ("linear"); "auto" takes the coarsest whose estimated plan fits.
    trainable: train every weight (lossless only): ``optimizer`` (neuzip_offload.optim.SGD or
        AdamW) updates each tensor as soon as its gradient exists, compressed weights are then
        re-encoded; ``grad_accum_steps``, ``clip_grad_norm``/``clip_mode``: see
        neuzip_offload/training.py. Without it, a model whose parameters are partly frozen (a
        LoRA model, say) gets only its frozen weights compressed: train the rest with any torch
        optimizer — backward decodes the frozen weights again, they are never saved.
    """
    check_model(model, allow_meta=checkpoint is not None)
    train = None
    if trainable:
        train = TrainOptions.build(mode, optimizer, grad_accum_steps, clip_grad_norm, clip_mode)
        if checkpoint is not None:
            raise ValueError("trainable=True with checkpoint=: load the weights first")
    elif optimizer is not None:
        raise ValueError("optimizer is used only with trainable=True")
    opts = DispatchOptions.build(
        max_gpu_mem,
        max_cpu_mem=max_cpu_mem,
        mode=mode,
        mantissa_bits=mantissa_bits,
        block_size=block_size,
        codec=codec,
        target_bits=target_bits,
        prefetch=prefetch,
        speculate=speculate,
        reserve=reserve,
        device=device,
        pcie_gbps=pcie_gbps,
        disk_gbps=disk_gbps,
        decode_gbps=decode_gbps,
        max_block_bytes=max_block_bytes,
        granularity=granularity,
        progress=progress,
        log_events=log_events,
    )
    if checkpoint is not None:
        if target_bits is not None:
            raise ValueError("target_bits needs the weights in memory: load them, then dispatch")
        if offload_dir is not None:
            cfg = opts.codec
            convert(
                checkpoint,
                offload_dir,
                mode=cfg.mode,
                codec=cfg.codec,
                mantissa_bits=cfg.mantissa_bits,
                block_size=cfg.block_size,
                progress=progress,
            )
            return _load(Checkpoint(offload_dir), opts, model, verify=True)
        tie_meta_weights(model)
    calibration = check_calibration(calibration)
    if calibration is not None and opts.target_bits is None:
        warnings.warn(
            "calibration= is used only to choose widths for target_bits; it is ignored here",
            stacklevel=2,
        )
    found = find_weights(model)
    dtype = found[0].dtype if found else torch.bfloat16
    bits = opts.target_bits or planning.estimated_bits(dtype, mode, mantissa_bits, block_size)
    weights, roots = planning.analyze_at_granularity(opts, model, bits, False, trainable)
    planning.refuse_hopeless(opts, model, weights, dtype, trainable)
    kept = {} if checkpoint is not None else planning.kept_decoded(opts, model, weights, trainable)
    encoded = [w for w in weights if not _is_kept(w, kept)]
    widths, compressed = compress_model(
        model, encoded, opts, shared_pool(), checkpoint, calibration
    )
    return _assemble(model, opts, weights, roots, compressed, {}, widths, train, kept)


def plan_model(
    model: nn.Module,
    max_gpu_mem: int | float | str | dict | None = None,
    *,
    mode: str = "lossless",
    mantissa_bits: int = 3,
    block_size: int = 512,
    bits_per_weight: float | None = None,
    max_cpu_mem: int | str | None = None,
    prefetch: int = 2,
    speculate: bool | None = None,
    reserve: int | str | None = "auto",
    device: torch.device | str = "cuda",
    pcie_gbps: float = 25.0,
    disk_gbps: float = 3.0,
    disk: bool = True,
    granularity: str = "auto",
    max_block_bytes: int | str | None = None,
    decode_gbps: float | None = None,
) -> Plan:
    """The plan ``dispatch``/``load`` would make, without compressing or allocating anything.

    Works on a model built on the meta device (e.g. from a config alone): compressed sizes come
    from ``bits_per_weight`` (default: estimated_bits for the mode). ``device`` only names the
    target: a CUDA plan can be made on a machine without a GPU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opts = DispatchOptions.build(
        max_gpu_mem,
        max_cpu_mem=max_cpu_mem,
        mode=mode,
        mantissa_bits=mantissa_bits,
        block_size=block_size,
        prefetch=prefetch,
        speculate=speculate,
        reserve=reserve,
        device=device,
        pcie_gbps=pcie_gbps,
        disk_gbps=disk_gbps,
        decode_gbps=decode_gbps,
        max_block_bytes=max_block_bytes,
        granularity=granularity,
        progress=False,
        log_events=False,
        target_only=True,
    )
    tie_meta_weights(model)
    found = find_weights(model)
    if not found:
        raise DispatchError("model has no Linear, Embedding or Conv1D weights to plan")
    bits = bits_per_weight or planning.estimated_bits(
        found[0].dtype, mode, mantissa_bits, block_size
    )
    weights, _ = planning.analyze_at_granularity(opts, model, bits, disk)
    return planning.estimated_plan(opts, model, weights, bits, disk)


def load(
    path: str | os.PathLike,
    max_gpu_mem: int | float | str | dict | None = None,
    *,
    max_cpu_mem: int | str | None = None,
    offload_dir: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    model_class: type | str | None = None,
    adapter: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    prefetch: int = 2,
    speculate: bool | None = None,
    reserve: int | str | None = "auto",
    pcie_gbps: float = 25.0,
    disk_gbps: float = 3.0,
    decode_gbps: float | None = None,
    granularity: str = "auto",
    verify: bool = True,
    progress: bool = True,
    log_events: bool = True,
) -> nn.Module:
    """Run a compressed checkpoint (from ``neuzip-offload compress`` or save_compressed).

    The model is built on the meta device from the checkpoint's config.json, of the class its
    ``architectures`` names (or ``model_class``, a transformers class or its name; or pass
    ``model``, built on meta); small tensors are read, the compressed weights are planned into
    tiers: what neither the device nor ``max_cpu_mem`` holds is read from the checkpoint's files
    as it is needed (checksums checked on every read). ``adapter``: a peft adapter directory
    (``save_pretrained``) to run over the compressed base. ``offload_dir``: copy the shards the disk
    tier reads to this (faster) disk first. ``verify``: check every tensor's checksum before
    planning.
    """
    opts = DispatchOptions.build(
        max_gpu_mem,
        max_cpu_mem=max_cpu_mem,
        prefetch=prefetch,
        speculate=speculate,
        reserve=reserve,
        device=device,
        pcie_gbps=pcie_gbps,
        disk_gbps=disk_gbps,
        decode_gbps=decode_gbps,
        granularity=granularity,
        progress=progress,
        log_events=log_events,
    )
    ck = Checkpoint(path)
    if model is None:
        model = model_from_config(ck.path, first_dtype(ck), model_class)
    elif model_class is not None:
        raise DispatchError("pass model= or model_class=, not both")
    if adapter is not None:  # a saved peft adapter over the compressed base
        model = with_adapter(model, adapter)
    check_model(model, allow_meta=True)
    return _load(ck, opts, model, verify, offload_dir)


def _load(
    ck: Checkpoint,
    opts: DispatchOptions,
    model: nn.Module,
    verify: bool,
    offload_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """load() once its options are built (dispatch(checkpoint=, offload_dir=) comes here too)."""
    tie_meta_weights(model)
    # weights stored in pieces a module cannot use are compressed again, losslessly
    opts = replace(opts, codec=CodecConfig().for_device(opts.device))
    check_codec(ck, opts.device)
    if verify:
        ck.verify(progress=opts.progress)
    if offload_dir is not None:
        ck = copy_shards(ck, Path(offload_dir))
    bits = stored_bits_per_weight(ck)
    weights, roots = planning.analyze_at_granularity(opts, model, bits, True)
    pool = shared_pool()
    prefix = getattr(model, "base_model_prefix", "")
    compressed, locations = place_weights(ck, weights, opts, pool, prefix)
    fill_model(ck, model, weights)
    return _assemble(model, opts, weights, roots, compressed, locations, {})


def _assemble(
    model: nn.Module,
    opts: DispatchOptions,
    weights: list[Weight],
    roots: list[str],
    compressed: dict,
    locations: dict,
    widths: dict[str, int | None],
    train: TrainOptions | None = None,
    kept: dict[str, CompressedTensor] | None = None,
) -> nn.Module:
    """Plan, build the executor, swap the modules, hook: the common end of dispatch and load.

    ``kept``: the stand-ins of the pieces never encoded (planning.kept_decoded), whose weights
    the executor takes as they are; should the plan stream one of them after all, they are
    encoded now and the plan made again, as if they had been from the start."""
    kept = kept or {}
    data, plan, planned = _plan(model, opts, weights, compressed, locations, kept, train)
    if not planning.unencoded_resident(plan, data):
        log.info("the plan streams blocks estimated to stay decoded: encoding them too")
        todo = [w for w in weights if _is_kept(w, kept)]
        more = compress_weights(
            todo, opts.codec, {}, shared_pool(), opts.progress, opts.encode_budget
        )
        compressed = {**compressed, **more}
        kept = {}
        data, plan, planned = _plan(model, opts, weights, compressed, locations, kept, train)
    opts = planned
    for w in weights:
        w.param = None  # the compressed copies (or the executor's resident tensors) are the truth
    compressed = {**compressed, **kept}
    # the weights never encoded are handed to the executor as they are: not released
    restore = release_device_originals([w for w in weights if not _is_kept(w, kept)], compressed)
    pool = shared_pool()
    try:
        executor = Executor(plan, data, opts.device, pool=pool, log_events=opts.log_events)
    except Exception:
        restore()
        raise
    records = PieceRecords(compressed, locations)
    trainer = None
    if train is not None:
        # the compressed weights' parameters are about to leave the model: the rest are plain
        compressed_params = {id(getattr(m, w.attr)) for w in weights for _, m in w.users}
        plain = [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in compressed_params
        ]
        trainer = Trainer(executor, records, train, pool, plain)
        for w in weights:  # resident decoded weights are their own truth: drop the copies
            for key, _, _ in w.pieces:
                if w.requires_grad and executor.is_resident(executor.block_index(key)):
                    records.keep_decoded(key)
    for key in kept:  # never encoded: encoded when read (save_compressed)
        records.keep_decoded(key)
    attachment = attach(model, weights, roots, executor, trainer)
    records.release(executor)
    model.neuzip = Dispatched(
        plan, executor, opts.codec, weights, records, attachment, pool, widths, trainer
    )
    return_freed_memory()  # the original weights and the encoder's scratch are gone
    return model


def _is_kept(w: Weight, kept: dict[str, CompressedTensor]) -> bool:
    """Whether ``w`` was left unencoded (a weight is kept with all its pieces or not at all)."""
    return w.pieces[0][0] in kept


def _plan(
    model: nn.Module,
    opts: DispatchOptions,
    weights: list[Weight],
    compressed: dict[str, CompressedTensor],
    locations: dict,
    kept: dict[str, CompressedTensor],
    train: TrainOptions | None,
) -> tuple[list[BlockData], Plan, DispatchOptions]:
    """(the blocks' data, the plan, the options with its decode rate) from the compressed
    pieces and the stand-ins of those never encoded (their weights still in ``weights``)."""
    decoded = {
        key: w.piece_of(w.param.detach(), a, b)
        for w in weights
        for key, a, b in w.pieces
        if key in kept
    }
    specs, data = block_builder.build(
        weights,
        opts.device,
        compressed={**compressed, **kept},
        locations=locations,
        decoded=decoded,
    )
    plan, planned = planning.measured_plan(opts, model, weights, specs, data, train is not None)
    return data, plan, planned


def undispatch(model: nn.Module) -> nn.Module:
    """Back to a plain model: decoded weights as parameters, everything on its original device."""
    handle: Dispatched | None = getattr(model, "neuzip", None)
    if handle is None:
        raise DispatchError("model is not dispatched")
    handle.attachment.detach(handle.close())
    del model.neuzip
    return model
