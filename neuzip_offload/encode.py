"""Compressing a model's weights: batches, the encode device, target_bits, HF files, re-encoding.

The step between analysis (model_analysis.py: weights and their pieces) and blocks (blocks.py):
every piece becomes a CompressedTensor whose planes live on the host. Pieces of one setting
are encoded in batches (bounding the encoder's temporaries); on CUDA a batch is encoded on the
GPU when its scratch fits in the device budget beside what the process holds there, else on
the host. ``target_bits`` chooses a lossy width per tensor (mixed.py) and checks it against
the real compressed size. A Hugging Face checkpoint is compressed as it streams, one tensor in
memory at a time. Training re-encodes an updated weight with the settings it had.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from . import backend
from .budget import device_encode_bytes
from .codec import compress_many
from .compressed import CompressedTensor
from .config import CodecConfig
from .expert_layout import fused_param, model_name
from .kernels import HAS_TRITON
from .mixed import MixedPrecision
from .model_analysis import (
    Weight,
    check_materialized,
    has_tensor,
    set_tensor,
    weight_names,
)
from .optim import StateMover
from .options import DispatchError, DispatchOptions
from .source import SourceFiles, source_shards

BATCH_WEIGHTS = 1 << 26  # weights per encoder call: bounds the encoder's temporaries
TARGET_TRIES = 4  # re-allocations of target_bits when the estimate was short


def config_for(cfg: CodecConfig, k: int | str | None) -> CodecConfig:
    """The settings for one tensor: the dispatch's ("default"), or its chosen width (None:
    lossless)."""
    if k == "default":
        return cfg
    if k is None:
        return CodecConfig(mode="lossless", codec=cfg.codec)
    return CodecConfig(mode="lossy", codec=cfg.codec, mantissa_bits=k, block_size=cfg.block_size)


def encode_on_device(cfg: CodecConfig, numel: int, itemsize: int, budget: int | None) -> bool:
    """Whether ``numel`` weights are encoded on the GPU (the Triton encoder instead of the
    host's numpy loop): rANS, a GPU present, and the encoder's scratch inside the device budget
    beside what this process already holds there."""
    if budget is None or cfg.codec != "ans" or not (HAS_TRITON and torch.cuda.is_available()):
        return False
    held = torch.cuda.memory_allocated()
    return held + device_encode_bytes(numel, itemsize) <= budget


def compress_weights(
    weights: list[Weight],
    cfg: CodecConfig,
    bits: dict[str, int | None],
    pool: Executor | None,
    progress: bool,
    device_budget: int | None = None,
) -> dict[str, CompressedTensor]:
    """Every piece, compressed in batches of one setting (with a progress bar); the results live
    on the host. ``bits``: a lossy width per weight key (None: lossless), else ``cfg``'s. With
    ``device_budget`` (bytes), batches whose encoder scratch fits beside what the process holds
    on the GPU are encoded there; the others, and pieces too large for it alone, on the host."""
    groups: dict[CodecConfig, list] = {}
    for w in weights:
        for key, a, b in w.pieces:  # k per piece where chosen per expert, else per weight
            c = config_for(cfg, bits.get(key, bits.get(w.key, "default")))
            groups.setdefault(c, []).append((w, key, a, b))
    out: dict[str, CompressedTensor] = {}
    bar = tqdm(
        total=sum(w.shape.numel() for w in weights),
        desc="compressing",
        unit="w",
        unit_scale=True,
        disable=not progress,
    )
    for c, jobs in groups.items():
        while jobs:
            batch, n, on_gpu = [], 0, False
            while jobs and (not batch or n < BATCH_WEIGHTS):
                w, key, a, b = jobs[0]
                t = w.piece_of(w.param.detach(), a, b)
                # a GPU batch grows while its scratch fits; a host batch ends at a piece that
                # fits the GPU on its own
                fits = encode_on_device(
                    c, t.numel() + (n if on_gpu else 0), t.element_size(), device_budget
                )
                if batch and fits != on_gpu:
                    break
                jobs.pop(0)
                batch.append((key, t))
                n += t.numel()
                on_gpu = fits
            dev = torch.device("cuda") if on_gpu else torch.device("cpu")
            tensors = [t.to(dev) for _, t in batch]
            cts = compress_many(tensors, c, names=[k for k, _ in batch], pool=pool)
            del tensors
            for (key, t), ct in zip(batch, cts, strict=True):
                out[key] = ct.cpu()
                bar.update(t.numel())
    bar.close()
    return out


def compress_to_target(
    model: nn.Module,
    weights: list[Weight],
    cfg: CodecConfig,
    target_bits: float,
    calibration: Sequence[torch.Tensor] | None,
    pool: Executor | None,
    progress: bool,
    device_budget: int | None = None,
) -> tuple[dict[str, int | None], dict[str, CompressedTensor]]:
    """Mixed k per tensor (mixed.py), checked against the real compressed size: (the width of
    each weight, the compressed pieces)."""
    mp = MixedPrecision(
        model, [(w.key, w.param) for w in weights], cfg.block_size, calibration, progress
    )
    total = sum(w.shape.numel() for w in weights)
    target = target_bits
    bits = mp.allocate(target)
    compressed = compress_weights(weights, cfg, bits, pool, progress, device_budget)
    for _ in range(TARGET_TRIES):
        actual = 8 * sum(ct.nbytes for ct in compressed.values()) / total
        if actual <= target_bits:
            break
        target -= actual - target_bits + 1e-3  # the estimate was short: aim lower
        new = mp.allocate(target)
        changed = [
            w
            for w in weights
            if any(new.get(k) != bits.get(k) for k in [w.key] + [p[0] for p in w.pieces])
        ]
        bits = new
        compressed.update(compress_weights(changed, cfg, bits, pool, False, device_budget))
    actual = 8 * sum(ct.nbytes for ct in compressed.values()) / total
    if actual > target_bits + 1e-3:
        narrowest = min((k for k in bits.values() if k is not None), default=None)
        warnings.warn(
            f"target_bits={target_bits:g} cannot be reached: the model is compressed to "
            f"{actual:.2f} bits per weight (narrowest width k={narrowest}; the sign and the "
            "coded exponent alone take about that). Ask for target_bits >= "
            f"{math.ceil(actual * 100) / 100:.2f}, or see model.neuzip.mantissa_bits",
            stacklevel=3,
        )
    return bits, compressed


def compress_model(
    model: nn.Module,
    weights: list[Weight],
    opts: DispatchOptions,
    pool: Executor | None,
    checkpoint: str | Path | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
) -> tuple[dict[str, int | None], dict[str, CompressedTensor]]:
    """Every weight's pieces compressed as ``opts`` say: (the lossy width chosen per weight
    when ``opts.target_bits`` asks for them, else empty; piece key → compressed tensor).
    ``checkpoint``: the weights are read from these Hugging Face files (the model is on meta)."""
    if checkpoint is not None:
        return {}, compress_from_files(model, weights, checkpoint, opts.codec, pool)
    if opts.target_bits is None:
        return {}, compress_weights(
            weights, opts.codec, {}, pool, opts.progress, opts.encode_budget
        )
    return compress_to_target(
        model,
        weights,
        opts.codec,
        opts.target_bits,
        calibration,
        pool,
        opts.progress,
        opts.encode_budget,
    )


def compress_from_files(
    model: nn.Module,
    weights: list[Weight],
    checkpoint: str | Path,
    cfg: CodecConfig,
    pool: Executor | None,
) -> dict[str, CompressedTensor]:
    """Stream a Hugging Face safetensors checkpoint into a model built on the meta device:
    compress the weights (one in memory at a time), place the other tensors. Fused expert
    parameters are compressed one expert at a time, from either layout (expert_layout.py)."""
    by_name = weight_names(weights)
    pending = {w.key: w for w in weights}
    compressed: dict[str, CompressedTensor] = {}
    src, experts = SourceFiles.of_dir(Path(checkpoint))
    for shard in source_shards(Path(checkpoint)):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if name in experts.consumed:
                    continue  # read below, one expert at a time
                w = by_name.get(name)
                if w is None:
                    # (Mixtral's Hub names its router "block_sparse_moe.gate", the model "mlp")
                    target = name if has_tensor(model, name) else model_name(name)
                    if has_tensor(model, target):
                        set_tensor(model, target, f.get_tensor(name))
                    continue
                if w.key not in pending:
                    continue  # a tied copy
                w.param = f.get_tensor(name)
                w.dtype = w.param.dtype
                compressed.update(compress_weights([w], cfg, {}, pool, progress=False))
                w.param = None
                del pending[w.key]
    prefix = getattr(model, "base_model_prefix", "")
    with src:
        for w in [w for w in pending.values() if fused_param(w.key) is not None]:
            pieces = experts.pieces_for(w.key, w.shape, prefix)
            if pieces is None:
                continue  # named below
            for key, a, b in w.pieces:  # one piece an expert: (key, e, e + 1), value param[e]
                assert b == a + 1, (key, a, b)
                t = src.piece(pieces[a])
                w.dtype = t.dtype
                compressed[key] = compress_many([t], cfg, names=[key], pool=pool)[0].cpu()
            del pending[w.key]
    if pending:
        raise DispatchError(f"the checkpoint lacks {sorted(pending)[:5]}")
    check_materialized(model, weights)
    return compressed


# ---------------------------------------------------------------------------------------------
# re-encoding an updated weight (training; saving a weight kept decoded)
# ---------------------------------------------------------------------------------------------


def _encode_like(
    weight: torch.Tensor, like: CompressedTensor, pool: Executor | None
) -> CompressedTensor:
    """The weight compressed as ``like`` was, fresh tables; planes where the encoder left them."""
    h = like.header
    cfg = CodecConfig(
        mode="lossless",
        codec=h.codec,
        chunk_size=h.chunk_size,
        lanes=h.lanes,
        prob_bits=h.prob_bits,
    )
    w = weight.detach().reshape(like.shape)
    if not (h.codec == "ans" and w.is_cuda and HAS_TRITON):
        w = w.cpu()
    return compress_many([w], cfg, names=[like.name], pool=pool)[0]


def reencode(
    weight: torch.Tensor, like: CompressedTensor, pool: Executor | None = None
) -> CompressedTensor:
    """The updated weight compressed as ``like`` was (fresh tables), returned on the host.

    A CUDA weight is encoded on the GPU (the Triton rANS encoder) when its codec is ans; only the
    compressed bytes cross to the host. Otherwise the host encoders run."""
    mover = StateMover()
    ct, ready = reencode_async(weight, like, mover, pool)
    ready.synchronize()  # the caller reads the planes now
    return ct


def reencode_async(
    weight: torch.Tensor,
    like: CompressedTensor,
    mover: StateMover,
    pool: Executor | None = None,
) -> tuple[CompressedTensor, object]:
    """``reencode`` without waiting: (tensor with its planes in fresh pinned host buffers,
    event after which the host may read them). The planes of a CUDA encode cross once,
    asynchronously, on the mover's copy stream; a host encode's planes are ready at once."""
    ct = _encode_like(weight, like, pool)
    planes = {k: mover.to_host(p) for k, p in ct.planes.items()}  # fresh buffers: none reused
    moved = [p.device for k, p in ct.planes.items() if planes[k] is not p]
    if not moved:  # a host encode: its planes are complete already
        return ct.with_planes(planes), backend.CpuEvent()
    # the copies of one device run in order on one stream: the last one's event covers all
    return ct.with_planes(planes), mover.last_event(moved[-1])
