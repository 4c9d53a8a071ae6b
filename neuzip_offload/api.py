"""dispatch(): compress a model's weights, plan their tiers, and run it through the executor.

    model = nzo.dispatch(model, max_gpu_mem="8GB")                       # lossless
    model = nzo.dispatch(model, max_gpu_mem="6GiB", mode="lossy", mantissa_bits=3)
    print(model.neuzip.plan); model.neuzip.stats
    nzo.undispatch(model)                                                # a plain model again

Compressed: the weight of every nn.Linear, nn.Embedding and transformers Conv1D (embeddings and
lm_head included; a tied pair is compressed once). Norms, biases and buffers move to the device
decoded. Blocks: the modules named by a transformers model's ``_no_split_modules`` (its decoder
layers), else the entries of its largest nn.ModuleList; every other compressed weight is a block
of its own, cut into row pieces when it is larger than the largest layer.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import budget as _budget
from . import calibrate as _calibrate
from . import pieces as piece_rule
from .calibrate import DecodeRate
from .codec import compress_many, decompress
from .compressed import CompressedTensor
from .config import CodecConfig
from .kernels import HAS_TRITON, planes
from .modules import CompressedModule, Piece, kind_of
from .scheduler.executor import Executor
from .scheduler.layout import PackedLayout, slot_layout
from .scheduler.plan import DEVICE, BlockSpec, Plan, PlanError, PlanOptions, make_plan
from .scheduler.store import BlockData
from .storage import pread_into
from .workers import shared_pool

log = logging.getLogger(__name__)


class DispatchError(ValueError):
    """A model or an option that dispatch cannot take, with the reason."""


# ---------------------------------------------------------------------------------------------
# model analysis
# ---------------------------------------------------------------------------------------------


@dataclass
class _Weight:
    key: str  # qualified name of the parameter
    param: nn.Parameter | None  # dropped once compressed
    users: list[tuple[str, nn.Module]]  # (qualified module name, module) that use it
    kind: type[CompressedModule]
    root: str | None = None  # the layer block holding it, if any
    pieces: list[tuple[str, int, int]] = field(default_factory=list)  # (key, start, stop)
    shape: torch.Size = field(init=False)
    dtype: torch.dtype = field(init=False)
    device: torch.device = field(init=False)
    requires_grad: bool = field(init=False)

    def __post_init__(self) -> None:
        p = self.param
        self.shape, self.dtype, self.device = p.shape, p.dtype, p.device
        self.requires_grad = p.requires_grad

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def _layer_roots(model: nn.Module) -> list[str]:
    """Names of the layer blocks: _no_split_modules classes, else the largest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    roots: list[str] = []
    if names:
        for qn, m in model.named_modules():
            if type(m).__name__ in names and not any(qn.startswith(r + ".") for r in roots):
                roots.append(qn)
    if roots:
        return roots
    best, best_params = None, 0
    for qn, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_params:
                best, best_params = qn, n
    if best is None:
        return []
    return [f"{best}.{i}" if best else str(i) for i in range(len(model.get_submodule(best)))]


GRANULARITIES = ("layer", "module", "linear")


def _block_roots(model: nn.Module, granularity: str) -> list[str]:
    """Roots of the blocks inside the layers: whole layers, their direct children that hold
    weights (attention, MLP), or every compressed module on its own."""
    layers = _layer_roots(model)
    if granularity == "layer":
        return layers
    roots = []
    for r in layers:
        layer = model.get_submodule(r)
        for name, child in layer.named_children():
            qn = f"{r}.{name}" if r else name
            held = [m for m in child.modules() if kind_of(m) is not None]
            if not held:
                continue
            if granularity == "module" or kind_of(child) is not None:
                roots.append(qn)
            else:
                roots.extend(
                    f"{qn}.{n}" for n, m in child.named_modules() if n and kind_of(m) is not None
                )
    return roots


def _weights(model: nn.Module, frozen_only: bool = False) -> dict[int, _Weight]:
    """Every compressible weight, once, with all modules that use it (tied weights: several).

    ``frozen_only``: skip weights that require grad (the adapters of a LoRA model)."""
    found: dict[int, _Weight] = {}
    for qn, m in model.named_modules():
        kind = kind_of(m)
        w = getattr(m, "weight", None)
        if kind is None or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if frozen_only and w.requires_grad:
            continue
        if id(w) in found:
            found[id(w)].users.append((qn, m))
        else:
            key = f"{qn}.weight" if qn else "weight"
            found[id(w)] = _Weight(key, w, [(qn, m)], kind)
    return found


def _inside(qn: str, root: str) -> bool:
    return qn == root or qn.startswith(root + ".")


# ---------------------------------------------------------------------------------------------
# the reserve for activations and KV cache
# ---------------------------------------------------------------------------------------------


def estimate_reserve(model: nn.Module, seq_len: int = 1024, batch: int = 1) -> int:
    """Bytes for KV cache and activations at ``batch`` x ``seq_len`` tokens, from the config.

    KV cache: 2 x layers x kv_heads x head_dim x tokens; activations: hidden states, attention
    and MLP intermediates of one layer (4 x hidden + 3 x intermediate per token); logits of the
    last position in fp32. 0 when the model has no transformers-style config.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        return 0

    def get(*names, default=None):
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
        return default

    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    if hidden is None or layers is None:
        return 0
    heads = get("num_attention_heads", "n_head", default=1)
    kv_heads = get("num_key_value_heads", default=heads)
    head_dim = get("head_dim", default=hidden // heads)
    inter = get("intermediate_size", "n_inner", default=None) or 4 * hidden
    vocab = get("vocab_size", default=0)
    seq = min(seq_len, get("max_position_embeddings", "n_positions", default=seq_len))
    dtype_bytes = 2
    for p in model.parameters():
        dtype_bytes = p.element_size()
        break
    tokens = batch * seq
    kv = 2 * layers * kv_heads * head_dim * tokens * dtype_bytes
    act = tokens * (4 * hidden + 3 * inter) * dtype_bytes
    return int(kv + act + batch * vocab * 4)


# ---------------------------------------------------------------------------------------------
# the handle
# ---------------------------------------------------------------------------------------------


@dataclass
class Dispatched:
    """What ``model.neuzip`` holds: the plan, the executor and how to undo the dispatch."""

    plan: Plan
    executor: Executor
    device: torch.device
    config: CodecConfig
    compressed: dict[str, CompressedTensor]  # piece key → compressed tensor (on the host)
    weights: list[_Weight]
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]]  # (parent, attr, original, new)
    hooks: list = field(default_factory=list)
    moved: list[tuple[torch.Tensor, torch.device]] = field(default_factory=list)
    pool: ThreadPoolExecutor | None = None  # the process's shared pool (workers.py)
    mantissa_bits: dict[str, int | None] = field(default_factory=dict)
    locations: dict[str, dict] = field(default_factory=dict)  # piece key → planes on disk
    trainer: object | None = None  # the fused optimizer's runtime (dispatch(trainable=True))
    dirty: set = field(default_factory=set)  # keys whose decoded resident tensor is the truth

    @property
    def optimizer(self):
        """The fused optimizer: change its hyper-parameters here (``.lr = ...``)."""
        if self.trainer is None:
            raise AttributeError("the model was not dispatched with trainable=True")
        return self.trainer.optimizer

    def compressed_tensor(self, key: str) -> CompressedTensor:
        """A piece with its planes in host memory: from the executor, which holds the only copy
        (its pinned host buffer, or the device), read from its file if it stays on disk, or
        encoded from the decoded weight when that is the truth (resident decoded, lossless)."""
        if key in self.dirty:  # the resident decoded weight is the truth: encode it now
            from .training import reencode

            return reencode(self.executor.weight(key), self.compressed[key], self.pool)
        ct = self.compressed[key]
        if key not in self.locations:
            if ct.device.type == "meta":  # the executor holds the bytes
                ct = self.executor.compressed(key)
            return ct.cpu()
        planes = {}
        for k, loc in self.locations[key].items():
            planes[k] = torch.empty(loc.nbytes, dtype=torch.uint8)
            pread_into(loc, planes[k])
        return CompressedTensor.from_state(ct.header.to_json(), planes, key)

    @property
    def stats(self) -> dict:
        """Bytes moved and decoded, time spent decoding, peak bytes held: per forward and total."""
        self.executor.settle()
        s = self.executor.stats
        return {
            "forwards": s.forwards,
            "per_forward": s.per_forward(),
            "copied_bytes": s.copied_bytes,
            "decoded_bytes": s.decoded_bytes,
            "decode_seconds": s.decode_seconds,
            "misses": s.misses,
            "peak_held_bytes": s.peak_held_bytes,
            "device_budget_bytes": self.plan.options.device_bytes,
        }

    @property
    def events(self):
        return self.executor.events


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def _check_model(model: object, allow_meta: bool = False) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "neuzip"):
        raise DispatchError("model is already dispatched; call neuzip_offload.undispatch(model)")
    if not allow_meta and any(p.device.type == "meta" for p in model.parameters()):
        raise DispatchError(
            "model has weights on the meta device and no checkpoint to fill them from; pass "
            "checkpoint= (a Hugging Face safetensors directory) or use neuzip_offload.load"
        )
    return model


@dataclass
class _Run:
    """The options of one dispatch, validated and resolved."""

    dev: torch.device
    cfg: CodecConfig
    device_bytes: int
    host_bytes: int
    prefetch: int
    reserve: int | str | None
    pcie_gbps: float
    disk_gbps: float
    progress: bool
    log_events: bool
    decode_rate: DecodeRate = None  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.decode_rate is None:
            self.decode_rate = DecodeRate.default(self.dev)


def _resolve(
    max_gpu_mem,
    max_cpu_mem,
    mode,
    mantissa_bits,
    block_size,
    target_bits,
    prefetch,
    reserve,
    device,
    codec,
    pcie_gbps,
    disk_gbps,
    progress,
    log_events,
) -> _Run:
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
    if target_bits is not None:
        if mode != "lossy":
            raise ValueError("target_bits chooses lossy mantissa widths: pass mode='lossy'")
        if not isinstance(target_bits, (int, float)) or not 2.0 <= target_bits <= 16.0:
            raise ValueError(f"target_bits must be a number in 2..16, got {target_bits!r}")
    for name, v in (("pcie_gbps", pcie_gbps), ("disk_gbps", disk_gbps)):
        if not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but CUDA is not available")
    cfg = CodecConfig(
        mode=mode, codec=codec, mantissa_bits=mantissa_bits, block_size=block_size
    ).for_device(dev)
    if dev.type == "cuda" and cfg.codec == "zstd":
        raise ValueError(
            "codec='zstd' decodes on the host, which would stall every block on a GPU; use "
            "codec='ans' (the default on CUDA), or device='cpu'"
        )
    host = (
        _budget.parse_size(max_cpu_mem, "max_cpu_mem")
        if max_cpu_mem is not None
        else _budget.host_available()
    )
    return _Run(
        dev,
        cfg,
        _device_budget(max_gpu_mem, dev),
        host,
        prefetch,
        reserve,
        float(pcie_gbps),
        float(disk_gbps),
        progress,
        log_events,
    )


def _partly_frozen(model: nn.Module) -> bool:
    flags = {p.requires_grad for p in model.parameters()}
    return flags == {True, False}


def _analyze(
    model: nn.Module, max_block_bytes, granularity: str = "layer", trainable: bool = False
) -> tuple[list[_Weight], list[str]]:
    """The compressible weights (with their block and pieces) and the block roots.

    A partly frozen model (LoRA) dispatched for inference-style use gets only its frozen
    weights compressed; ``trainable`` compresses every weight."""
    weights = list(_weights(model, frozen_only=not trainable and _partly_frozen(model)).values())
    if not weights:
        raise DispatchError(
            "model has no Linear, Embedding or Conv1D weights to compress; nothing to dispatch"
        )
    for w in weights:
        if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise DispatchError(f"{w.key} has dtype {w.dtype}; expected bf16, fp16 or fp32")
        for _, m in w.users:
            if isinstance(m, nn.Embedding) and m.max_norm is not None:
                raise DispatchError(f"{w.key}: Embedding(max_norm=...) rewrites its weight")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    roots = _block_roots(model, granularity)
    for w in weights:
        owner = w.users[0][0]
        w.root = next((r for r in roots if _inside(owner, r)), None)
    layer_bytes = {r: 0 for r in roots}
    for w in weights:
        if w.root is not None:
            layer_bytes[w.root] += w.nbytes
    limit = (
        _budget.parse_size(max_block_bytes, "max_block_bytes")
        if max_block_bytes is not None
        else max(layer_bytes.values(), default=0)
    )
    _cut_pieces(weights, limit, trainable)
    return weights, roots


def dispatch(
    model: nn.Module,
    max_gpu_mem: int | str | None = None,
    *,
    mode: str = "lossless",
    mantissa_bits: int = 3,
    block_size: int = 512,
    target_bits: float | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
    max_cpu_mem: int | str | None = None,
    prefetch: int = 2,
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
    max_gpu_mem / max_cpu_mem: "8GB" (10^9), "8GiB" (2^30) or bytes; default: what is free.
    prefetch: blocks copied and decoded ahead of the running one.
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
    _check_model(model, allow_meta=checkpoint is not None)
    if trainable:
        if mode != "lossy":
            from .optim import check

            if optimizer is None:
                raise ValueError(
                    "trainable=True needs optimizer=neuzip_offload.optim.SGD(...) or AdamW(...)"
                )
            check(optimizer)
        else:
            raise ValueError(
                "trainable=True needs mode='lossless': lossy weights are for inference (an "
                "update smaller than the dropped mantissa bits would be lost on re-encoding)"
            )
        if checkpoint is not None:
            raise ValueError("trainable=True with checkpoint=: load the weights first")
    elif optimizer is not None:
        raise ValueError("optimizer is used only with trainable=True")
    run = _resolve(
        max_gpu_mem,
        max_cpu_mem,
        mode,
        mantissa_bits,
        block_size,
        target_bits,
        prefetch,
        reserve,
        device,
        codec,
        pcie_gbps,
        disk_gbps,
        progress,
        log_events,
    )
    if decode_gbps is not None:
        run.decode_rate = DecodeRate.given(decode_gbps)
    if checkpoint is not None:
        if target_bits is not None:
            raise ValueError("target_bits needs the weights in memory: load them, then dispatch")
        if offload_dir is not None:
            from .checkpoint import convert

            convert(
                checkpoint,
                offload_dir,
                mode=run.cfg.mode,
                codec=run.cfg.codec,
                mantissa_bits=run.cfg.mantissa_bits,
                block_size=run.cfg.block_size,
                progress=progress,
            )
            return load(
                offload_dir,
                max_gpu_mem=run.device_bytes,
                max_cpu_mem=run.host_bytes,
                model=model,
                device=run.dev,
                prefetch=prefetch,
                reserve=reserve,
                pcie_gbps=pcie_gbps,
                disk_gbps=disk_gbps,
                decode_gbps=decode_gbps,
                progress=progress,
                log_events=log_events,
            )
    if checkpoint is not None:
        _tie(model)
    dtype = next(iter(_weights(model).values())).dtype if _weights(model) else torch.bfloat16
    bits = target_bits or estimated_bits(dtype, mode, mantissa_bits, block_size)
    weights, roots = _granular(
        model, run, max_block_bytes, granularity, bits, on_disk=False, trainable=trainable
    )
    _refuse_hopeless(model, run, weights, roots, dtype, trainable)
    pool = shared_pool()
    bits: dict[str, int | None] = {}  # k per tensor, when target_bits chose them
    if checkpoint is not None:
        compressed = _compress_from_files(model, weights, checkpoint, run.cfg, pool, progress)
    elif target_bits is None:
        compressed = _compress(weights, run.cfg, bits, pool, progress, _gpu_budget(run))
    else:
        bits, compressed = _compress_to_target(
            model, weights, run.cfg, target_bits, calibration, pool, progress, _gpu_budget(run)
        )
    training = None
    if trainable:
        training = {
            "optimizer": optimizer,
            "grad_accum_steps": grad_accum_steps,
            "clip_grad_norm": clip_grad_norm,
            "clip_mode": clip_mode,
        }
    return _finish(model, run, weights, roots, compressed, {}, bits, pool, training)


def estimated_bits(
    dtype: torch.dtype, mode: str, mantissa_bits: int = 3, block_size: int = 512
) -> float:
    """Bits per weight to expect before compressing: the raw bits kept plus ~2.65 bits of coded
    exponent (measured on MiniLM and SmolLM2, BENCHMARKS.md) and the index."""
    if mode == "lossy":
        return 1 + mantissa_bits + 2.65 + 7 / block_size + 0.03
    return _raw_bits(dtype) + 2.65 + 0.03


def _raw_bits(dtype: torch.dtype) -> int:
    """Bits per weight a lossless plane keeps uncoded (sign and mantissa), from the format."""
    layout = planes.lossless_layout(dtype)
    return 8 * layout.raw_bytes + layout.field_bits


def _estimated_specs(weights, roots, dev, bits: float, on_disk: bool) -> list[BlockSpec]:
    """Block sizes without compressing: decoded exactly, compressed from ``bits`` per weight."""
    groups: list[tuple[str, list[tuple[int, torch.dtype]], int]] = []
    seen: set[str] = set()
    for w in weights:
        if w.root is None:
            for key, a, b in w.pieces:
                n = w.shape.numel() * (b - a) // max(w.shape[w.kind.split_dim], 1)
                groups.append((key, [(n, w.dtype)], len(w.users)))
        elif w.root not in seen:
            seen.add(w.root)
            members = [(v.shape.numel(), v.dtype) for v in weights if v.root == w.root]
            groups.append((w.root, members, 1))
    specs = []
    for name, members, uses in groups:
        decoded = sum((n * d.itemsize + 255) // 256 * 256 for n, d in members)
        compressed = sum(int(n * bits / 8) + 1024 for n, _ in members)
        largest = max(n for n, _ in members)
        chunks = (largest + (1 << 16) - 1) >> 16
        ws = 4 * (chunks << 12) if dev.type == "cuda" else largest
        setup = int(largest * bits / 8) + 1024
        specs.append(
            BlockSpec(
                name,
                sum(n for n, _ in members),
                decoded,
                compressed,
                ws,
                uses,
                on_disk=on_disk,
                setup_bytes=setup,
            )
        )
    return specs


def _granular(
    model,
    run: _Run,
    max_block_bytes,
    granularity: str,
    bits: float,
    on_disk: bool,
    trainable: bool = False,
):
    """(weights, roots) at the granularity asked, or for "auto" the coarsest whose estimated plan
    fits: whole layers, else their attention/MLP parts, else single matrices."""
    if granularity != "auto":
        return _analyze(model, max_block_bytes, granularity, trainable)
    for g in GRANULARITIES:
        weights, roots = _analyze(model, max_block_bytes, g, trainable)
        try:
            _estimated_plan(model, run, weights, roots, bits, on_disk)
            return weights, roots
        except PlanError:
            continue
    return weights, roots


def _training_scratch(weights, dev: torch.device) -> int:
    """Device bytes re-encoding the largest trained piece holds (the GPU encoder), else 0."""
    if dev.type != "cuda":
        return 0
    largest = [
        (w.shape.numel() * (b - a) // max(w.shape[w.kind.split_dim], 1), w.dtype.itemsize)
        for w in weights
        if w.requires_grad
        for _, a, b in (w.pieces or [(w.key, 0, w.shape[w.kind.split_dim])])
    ]
    return max((_budget.device_encode_bytes(n, s) for n, s in largest), default=0)


def _plan_options(
    model, run: _Run, resident: int, disk: bool, weights=None, trainable: bool = False
) -> PlanOptions:
    dev = run.dev
    rate = run.decode_rate
    return PlanOptions(
        device_bytes=run.device_bytes,
        host_bytes=run.host_bytes,
        reserve_bytes=_reserve(run.reserve, model, dev, run.device_bytes),
        resident_bytes=resident,
        prefetch=run.prefetch,
        copies=dev.type == "cuda",
        pcie_gbps=run.pcie_gbps,
        decode_gbps=rate.gbps,
        decode_source=rate.describe(dev),
        device=str(dev),
        disk=disk,
        disk_gbps=run.disk_gbps,
        # re-encoded weights change size: no packed device copies; their encoder's scratch
        device_compressed=not trainable,
        scratch_bytes=_training_scratch(weights, dev) if trainable else 0,
    )


def _estimated_plan(
    model, run: _Run, weights, roots, bits: float, on_disk: bool, trainable: bool = False
) -> Plan:
    specs = _estimated_specs(weights, roots, run.dev, bits, on_disk)
    resident = _resident_bytes(model, weights)
    return make_plan(specs, _plan_options(model, run, resident, on_disk, weights, trainable))


def _refuse_hopeless(model, run: _Run, weights, roots, dtype, trainable: bool) -> None:
    """Raise PlanError before anything is compressed when no placement can fit: the plan is made
    with compressed sizes at their floor (the raw bits alone, exponents coded in 0 bits), so a
    budget refused here is refused by every real plan too. The error's minimum_device_bytes is
    then that of sizes at their ceiling (exponents stored whole): a budget that surely fits."""
    cfg = run.cfg
    raw = 1 + cfg.mantissa_bits if cfg.mode == "lossy" else _raw_bits(dtype)
    try:
        _estimated_plan(model, run, weights, roots, raw, False, trainable)
    except PlanError as e:
        if e.minimum_device_bytes is None:  # the host budget: nothing better to say
            raise
        try:
            _estimated_plan(model, run, weights, roots, 1.05 * (raw + 9), False, trainable)
            enough = run.device_bytes
        except PlanError as ceiling:
            enough = ceiling.minimum_device_bytes or e.minimum_device_bytes
        raise PlanError(
            f"{e} (refused before compressing: max_gpu_mem={enough} bytes fits whatever the "
            "weights compress to)",
            minimum_device_bytes=enough,
        ) from None


def plan_model(
    model: nn.Module,
    max_gpu_mem: int | str | None = None,
    *,
    mode: str = "lossless",
    mantissa_bits: int = 3,
    block_size: int = 512,
    bits_per_weight: float | None = None,
    max_cpu_mem: int | str | None = None,
    prefetch: int = 2,
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
    dev = torch.device(device)
    CodecConfig(mode=mode, mantissa_bits=mantissa_bits, block_size=block_size)  # validates
    device_bytes = (
        _budget.parse_size(max_gpu_mem, "max_gpu_mem")
        if max_gpu_mem is not None
        else _device_budget(None, dev)
    )
    host = (
        _budget.parse_size(max_cpu_mem, "max_cpu_mem")
        if max_cpu_mem is not None
        else _budget.host_available()
    )
    run = _Run(
        dev,
        CodecConfig(mode=mode),
        device_bytes,
        host,
        prefetch,
        reserve,
        float(pcie_gbps),
        float(disk_gbps),
        False,
        False,
    )
    if decode_gbps is not None:
        run.decode_rate = DecodeRate.given(decode_gbps)
    _tie(model)
    sample = next(iter(_weights(model).values()), None)
    if sample is None:
        raise DispatchError("model has no Linear, Embedding or Conv1D weights to plan")
    bits = bits_per_weight or estimated_bits(sample.dtype, mode, mantissa_bits, block_size)
    weights, roots = _granular(model, run, max_block_bytes, granularity, bits, disk)
    return _estimated_plan(model, run, weights, roots, bits, disk)


def _finish(
    model, run: _Run, weights, roots, compressed, locations, bits, pool, training=None
) -> nn.Module:
    """Plan, build the executor, swap the modules, hook: the common end of dispatch and load."""
    resident = _resident_bytes(model, weights)
    for w in weights:
        w.param = None  # the compressed copies are the truth now
    blocks, specs = _blocks(weights, compressed, locations, run.dev)
    dev = run.dev
    options = _plan_options(model, run, resident, bool(locations), weights, bool(training))
    plan = make_plan(specs, options)  # fits: so does timing one block (see calibrate.py)
    if dev.type == "cuda" and run.decode_rate.source == "default":
        run.decode_rate = _calibrate.measured_rate(blocks, specs, dev, run.cfg)
        options = _plan_options(model, run, resident, bool(locations), weights, bool(training))
        plan = make_plan(specs, options)
    log.info("neuzip plan:\n%s", plan)
    restore = _release_device_originals(weights, compressed)
    try:
        executor = Executor(plan, blocks, dev, pool=pool, log_events=run.log_events)
    except Exception:
        restore()
        raise
    handle = Dispatched(
        plan,
        executor,
        dev,
        run.cfg,
        compressed,
        weights,
        [],
        pool=pool,
        mantissa_bits=bits,
        locations=locations,
    )
    _swap_modules(model, weights, executor, handle)
    _move_resident(model, dev, handle)
    _hook(model, weights, roots, executor, handle)
    if training is not None:
        from .training import Trainer

        plain = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        handle.trainer = Trainer(handle, plain=plain, **training)
        trained = {w.key for w in weights if w.requires_grad}
        for w in weights:  # resident decoded weights are their own truth: drop the copies
            for key, _, _ in w.pieces:
                if w.requires_grad and executor.is_resident(executor.block_index(key)):
                    handle.dirty.add(key)
                    handle.compressed[key] = handle.compressed[key].placeholder()
        for _, _, _, new in handle.swaps:
            if any(p.key in trained or p.key.split("[")[0] in trained for p in new.pieces):
                object.__setattr__(new, "_trainer", handle.trainer)
    _keep_one_copy(handle)
    model.neuzip = handle
    from .training import return_freed_memory

    return_freed_memory()  # the original weights and the encoder's scratch are gone
    return model


def _keep_one_copy(handle: Dispatched) -> None:
    """The executor holds every block's compressed bytes (pinned host, device, or its file), so
    the handle keeps only headers and reads through it: the model is not held twice. Weights
    that a lossless plan keeps decoded on the device keep no compressed copy either: they are
    encoded again when saved (the encoder is deterministic: the same bytes). Lossy ones keep
    theirs (their decoded values do not give their bytes back)."""
    ex = handle.executor
    for key, ct in list(handle.compressed.items()):
        if key in handle.locations or ct.device.type == "meta":
            continue
        if ex.tier_of(key) == DEVICE:
            if ct.header.lossy:
                continue
            handle.dirty.add(key)
        handle.compressed[key] = ct.placeholder()


def _release_device_originals(weights, compressed) -> Callable[[], None]:
    """A model passed on the GPU lets go of its original weights before the executor allocates
    (the compressed copies are the truth now), so originals and runtime never hold device memory
    together. Returns what puts them back, decoded, if the executor cannot be built."""
    released = []
    for w in weights:
        for _, m in w.users:
            p = getattr(m, "weight", None)
            if isinstance(p, torch.Tensor) and p.device.type == "cuda" and p.numel():
                released.append((p, w))
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def restore() -> None:
        for p, w in released:
            parts = [decompress(compressed[key]) for key, _, _ in w.pieces]
            full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=w.kind.split_dim)
            p.data = full.reshape(w.shape).to(p.device)

    return restore


# ---------------------------------------------------------------------------------------------
# weights from files: a Hugging Face checkpoint (compress while loading), or a neuzip checkpoint
# ---------------------------------------------------------------------------------------------


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a loaded parameter or buffer in place of its meta placeholder."""
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, "cpu", value=value)


def _weight_names(weights: list[_Weight]) -> dict[str, _Weight]:
    """Every parameter name under which a compressed weight appears (tied: several)."""
    names = {}
    for w in weights:
        for qn, _ in w.users:
            names[f"{qn}.weight" if qn else "weight"] = w
    return names


def _compress_from_files(model, weights, checkpoint, cfg, pool, progress) -> dict:
    """Stream a Hugging Face safetensors checkpoint: compress the weights, place the rest."""
    from safetensors import safe_open

    from .checkpoint import source_shards

    by_name = _weight_names(weights)
    pending = {w.key: w for w in weights}
    compressed: dict[str, CompressedTensor] = {}
    for shard in source_shards(Path(checkpoint)):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                w = by_name.get(name)
                if w is None:
                    if _has_tensor(model, name):
                        _set_tensor(model, name, f.get_tensor(name))
                    continue
                if w.key not in pending:
                    continue  # a tied copy
                w.param = f.get_tensor(name)
                w.dtype = w.param.dtype
                compressed.update(_compress([w], cfg, {}, pool, progress=False))
                w.param = None
                del pending[w.key]
    if pending:
        raise DispatchError(f"the checkpoint lacks {sorted(pending)[:5]}")
    _check_materialized(model, weights)
    return compressed


def _has_tensor(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    return leaf in module._parameters or leaf in module._buffers


def _check_materialized(model: nn.Module, weights: list[_Weight]) -> None:
    skip = set(_weight_names(weights))
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in skip]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        raise DispatchError(
            f"the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )


def model_from_config(path: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM a folder's config.json describes, built on the meta device (no weights
    allocated): what load() fills from a checkpoint and plan_model() plans from a config."""
    if not (path / "config.json").exists():
        raise DispatchError(f"{path} has no config.json: pass model= (built on the meta device)")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with init_empty_weights():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers before 4.56 call it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.eval()


def _tie(model: nn.Module) -> None:
    """Tie a meta-built transformers model's weights as its config says (from_config under
    init_empty_weights leaves them untied in recent transformers)."""
    if any(p.device.type == "meta" for p in model.parameters()) and hasattr(model, "tie_weights"):
        model.tie_weights()


def load(
    path: str | os.PathLike,
    max_gpu_mem: int | str | None = None,
    *,
    max_cpu_mem: int | str | None = None,
    offload_dir: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    device: torch.device | str | None = None,
    prefetch: int = 2,
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

    The model is built on the meta device from the checkpoint's config.json (or pass ``model``,
    built on meta); small tensors are read, the compressed weights are planned into tiers: what
    neither the device nor ``max_cpu_mem`` holds is read from the checkpoint's files as it is
    needed (checksums checked on every read). ``offload_dir``: copy the shards the disk tier reads
    to this (faster) disk first. ``verify``: check every tensor's checksum before planning.
    """
    from .checkpoint import Checkpoint

    ck = Checkpoint(path)
    first = next((e for e in ck.entries.values() if e.kind == "compressed"), None)
    dtype = getattr(torch, first.dtype) if first is not None else torch.bfloat16
    if model is None:
        model = model_from_config(ck.path, dtype)
    _check_model(model, allow_meta=True)
    _tie(model)
    run = _resolve(
        max_gpu_mem,
        max_cpu_mem,
        "lossless",
        3,
        512,
        None,
        prefetch,
        reserve,
        device,
        None,
        pcie_gbps,
        disk_gbps,
        progress,
        log_events,
    )
    if decode_gbps is not None:
        run.decode_rate = DecodeRate.given(decode_gbps)
    if run.dev.type == "cuda" and ck.settings.get("codec") == "zstd":
        raise DispatchError(
            f"{ck.path} is coded with zstd, a host codec: on a GPU every block would be decoded "
            "on the host. Convert it for the GPU with `neuzip-offload compress --codec ans`, or "
            "load it with device='cpu'"
        )
    if run.dev.type == "cpu" and ck.settings.get("codec") == "ans":
        log.warning(
            "%s is coded with ans, which the CPU decodes at ~0.1 GB/s; for CPU inference convert "
            "with codec='zstd' (neuzip-offload compress --codec zstd)",
            ck.path,
        )
    if verify:
        ck.verify(progress=progress)
    if offload_dir is not None:
        ck = _copy_shards(ck, Path(offload_dir))
    n_params = sum(math.prod(e.shape) for e in ck.entries.values() if e.kind == "compressed")
    bits = 8 * ck.compressed_bytes() / max(n_params, 1)
    weights, roots = _granular(model, run, None, granularity, bits, on_disk=True)
    compressed, locations = {}, {}
    pool = shared_pool()
    for w in weights:
        entry = _entry_for(ck, w)
        w.dtype = getattr(torch, entry.dtype)
        dims = {kind_of(m).split_dim for _, m in w.users}
        if entry.kind == "compressed" and (len(entry.pieces) == 1 or dims == {0}):
            w.pieces = [(p, a, b) for p, _, a, b in entry.pieces]
            for p, shard, _, _ in entry.pieces:
                header = ck.header(p, shard)
                sizes = header.plane_sizes()
                placeholders = {
                    k: torch.empty(n, dtype=torch.uint8, device="meta") for k, n in sizes.items()
                }
                compressed[p] = CompressedTensor(header, placeholders, p)
                locations[p] = ck.locations(p, shard)
        else:  # stored plain, or in pieces this module cannot use: decode and compress again
            w.param = _read_entry(ck, entry)
            _cut_pieces([w], max(_layer_sizes(weights).values(), default=0))
            compressed.update(
                _compress([w], run.cfg, {}, pool, progress=False, device_budget=_gpu_budget(run))
            )
    _unify_blocks(weights, compressed, locations, ck)
    weight_names = _weight_names(weights)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in weight_names or t.device.type != "meta":
            continue
        key = name if name in ck.entries else ck.aliases.get(name)
        if key is None:
            raise DispatchError(f"{path}: the checkpoint lacks {name}")
        _set_tensor(model, name, _read_entry(ck, ck.entries[key]))
    _check_materialized(model, weights)
    return _finish(model, run, weights, roots, compressed, locations, {}, pool)


def _entry_for(ck, w: _Weight):
    for qn, _ in w.users:
        name = f"{qn}.weight" if qn else "weight"
        key = name if name in ck.entries else ck.aliases.get(name)
        if key is not None:
            return ck.entries[key]
    raise DispatchError(f"{ck.path}: the checkpoint lacks {w.key}")


def _read_entry(ck, entry) -> torch.Tensor:
    """A tensor of the checkpoint, decoded (pieces joined)."""
    if entry.kind == "plain":
        return ck.read_plain(entry.name)
    # read_compressed checked each checksum already
    parts = [
        decompress(ck.read_compressed(p, shard), verify=False) for p, shard, _, _ in entry.pieces
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _layer_sizes(weights: list[_Weight]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for w in weights:
        if w.root is not None:
            sizes[w.root] = sizes.get(w.root, 0) + w.nbytes
    return sizes


def _unify_blocks(weights, compressed, locations, ck) -> None:
    """A layer block is read from disk whole or held in memory whole: read stragglers now."""
    for root in {w.root for w in weights if w.root is not None}:
        keys = [k for w in weights if w.root == root for k, _, _ in w.pieces]
        on_disk = [k for k in keys if k in locations]
        if on_disk and len(on_disk) != len(keys):
            for k in on_disk:
                loc = locations.pop(k)
                shard = next(iter(loc.values())).path.name
                compressed[k] = ck.read_compressed(k, shard)


def _copy_shards(ck, dst: Path):
    """The checkpoint's shards copied to ``dst`` (a faster disk), reopened there."""
    import shutil

    from .checkpoint import INDEX_NAME, Checkpoint

    dst.mkdir(parents=True, exist_ok=True)
    for f in [
        INDEX_NAME,
        *sorted(
            {p[1] for e in ck.entries.values() if e.pieces for p in e.pieces}
            | {e.shard for e in ck.entries.values() if e.shard}
        ),
    ]:
        if not (dst / f).exists() or (dst / f).stat().st_size != (ck.path / f).stat().st_size:
            shutil.copyfile(ck.path / f, dst / f)
    return Checkpoint(dst)


def _device_budget(max_gpu_mem, dev: torch.device) -> int:
    if max_gpu_mem is not None:
        return _budget.parse_size(max_gpu_mem, "max_gpu_mem")
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.9)
    return _budget.host_available()


def _reserve(reserve, model: nn.Module, dev: torch.device, device_bytes: int) -> int:
    if reserve is None:
        return 0
    if reserve == "auto":
        est = estimate_reserve(model)
        if est == 0 and dev.type == "cuda":
            est = device_bytes // 10
        return est
    return _budget.parse_size(reserve, "reserve")


def _cut_pieces(weights: list[_Weight], limit: int, trainable: bool = False) -> None:
    """Row (or, for Conv1D, column) pieces for weights outside the layers larger than ``limit``.

    Not when training through a Linear or Conv1D: its input gradient would then be summed piece
    by piece, in another order than one matrix product sums it (not bit-identical)."""
    for w in weights:
        nbytes = w.nbytes
        dim = w.kind.split_dim
        length = w.shape[dim]
        split_dims = {kind_of(m).split_dim for _, m in w.users}
        whole = trainable and any(not isinstance(m, nn.Embedding) for _, m in w.users)
        cuts = piece_rule.cut(length, nbytes, limit)
        if w.root is not None or len(split_dims) > 1 or whole or len(cuts) == 1:
            w.pieces = [(w.key, 0, length)]
            continue
        w.pieces = [(f"{w.key}[{i}]", a, b) for i, (a, b) in enumerate(cuts)]


def _config_for(cfg: CodecConfig, k) -> CodecConfig:
    """The settings for one tensor: the dispatch's, or its chosen width (None: lossless)."""
    if k == "default":
        return cfg
    if k is None:
        return CodecConfig(mode="lossless", codec=cfg.codec)
    return CodecConfig(mode="lossy", codec=cfg.codec, mantissa_bits=k, block_size=cfg.block_size)


def _gpu_budget(run: _Run) -> int | None:
    """The device budget that compression on the GPU must respect (None: encode on the host)."""
    return run.device_bytes if run.dev.type == "cuda" else None


def _encode_on_device(cfg: CodecConfig, numel: int, itemsize: int, budget: int | None) -> bool:
    """Whether ``numel`` weights are encoded on the GPU (the Triton encoder instead of the
    host's numpy loop): rANS, a GPU present, and the encoder's scratch inside the device budget
    beside what this process already holds there."""
    if budget is None or cfg.codec != "ans" or not (HAS_TRITON and torch.cuda.is_available()):
        return False
    held = torch.cuda.memory_allocated()
    return held + _budget.device_encode_bytes(numel, itemsize) <= budget


def _compress(
    weights, cfg: CodecConfig, bits, pool, progress: bool, device_budget: int | None = None
) -> dict[str, CompressedTensor]:
    """Every piece, compressed in batches of one setting (with a progress bar); the results live
    on the host. With ``device_budget`` (bytes), batches whose encoder scratch fits beside what
    the process holds on the GPU are encoded there; the others, and pieces too large for it
    alone, on the host."""
    groups: dict[CodecConfig, list] = {}
    for w in weights:
        c = _config_for(cfg, bits.get(w.key, "default"))
        groups.setdefault(c, []).extend((w, key, a, b) for key, a, b in w.pieces)
    out: dict[str, CompressedTensor] = {}
    bar = tqdm(
        total=sum(w.shape.numel() for w in weights),
        desc="compressing",
        unit="w",
        unit_scale=True,
        disable=not progress,
    )
    batch_limit = 1 << 26  # weights per call: bounds the encoder's temporaries
    for c, jobs in groups.items():
        while jobs:
            batch, n, on_gpu = [], 0, False
            while jobs and (not batch or n < batch_limit):
                w, key, a, b = jobs[0]
                t = w.param.detach()
                if len(w.pieces) > 1:
                    t = t.narrow(w.kind.split_dim, a, b - a)
                # a GPU batch grows while its scratch fits; a host batch ends at a piece that
                # fits the GPU on its own
                fits = _encode_on_device(
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


def _compress_to_target(
    model, weights, cfg, target_bits, calibration, pool, progress, device_budget=None
):
    """Mixed k per tensor (neuzip_offload/mixed.py), checked against the real compressed size."""
    from .mixed import MixedPrecision

    mp = MixedPrecision(
        model, [(w.key, w.param) for w in weights], cfg.block_size, calibration, progress
    )
    total = sum(w.shape.numel() for w in weights)
    target = target_bits
    bits = mp.allocate(target)
    compressed = _compress(weights, cfg, bits, pool, progress, device_budget)
    for _ in range(4):
        actual = 8 * sum(ct.nbytes for ct in compressed.values()) / total
        if actual <= target_bits:
            break
        target -= actual - target_bits + 1e-3  # the estimate was short: aim lower
        new = mp.allocate(target)
        changed = [w for w in weights if new[w.key] != bits[w.key]]
        bits = new
        compressed.update(_compress(changed, cfg, bits, pool, False, device_budget))
    return bits, compressed


def _blocks(
    weights, compressed, locations, dev: torch.device
) -> tuple[list[BlockData], list[BlockSpec]]:
    """BlockData for the executor and BlockSpec for the planner, in module order."""
    items: list[tuple[str, list[str], int]] = []  # (name, keys, uses per forward)
    seen_roots: set[str] = set()
    for w in weights:
        if w.root is None:
            items.extend((key, [key], len(w.users)) for key, _, _ in w.pieces)
        elif w.root not in seen_roots:
            seen_roots.add(w.root)
            keys = [key for v in weights if v.root == w.root for key, _, _ in v.pieces]
            items.append((w.root, keys, 1))
    data, specs = [], []
    for name, keys, uses in items:
        cts = [compressed[k] for k in keys]
        _, slot_bytes = slot_layout(cts, keys)
        if dev.type == "cuda":  # rANS slot tables, int32, one tensor at a time
            ws = max(
                (
                    4 * (ct.header.n_chunks << ct.header.prob_bits)
                    for ct in cts
                    if ct.codec == "ans"
                ),
                default=0,
            )
        else:  # the zstd symbol buffer
            ws = max((ct.numel for ct in cts if ct.codec == "zstd"), default=0)
        nbytes = PackedLayout.of(cts).nbytes + sum(ct.header_nbytes for ct in cts)
        # made resident decoded, its tensors visit the device compressed one at a time (where
        # blocks are copied: the plan counts it only then)
        setup = max((ct.nbytes for ct in cts), default=0)
        on_disk = all(k in locations for k in keys)
        data.append(BlockData(name, keys, cts, [locations[k] for k in keys] if on_disk else None))
        specs.append(
            BlockSpec(
                name,
                sum(ct.numel for ct in cts),
                slot_bytes,
                nbytes,
                ws,
                uses,
                stored_bytes=sum(ct.nbytes for ct in cts),
                on_disk=on_disk,
                setup_bytes=setup,
            )
        )
    return data, specs


def _resident_bytes(model: nn.Module, weights: list[_Weight]) -> int:
    """Bytes of the parameters and buffers that stay decoded (everything but the weights)."""
    skip = set(_weight_names(weights))
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in skip or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _move_resident(model: nn.Module, dev: torch.device, handle: Dispatched) -> None:
    """Parameters and buffers still in the model (the compressed weights are gone) → device."""
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.device != dev:
            handle.moved.append((t, t.device))
            t.data = t.data.to(dev)


def _swap_modules(model: nn.Module, weights, executor: Executor, handle: Dispatched) -> None:
    for w in weights:
        pieces = [Piece(key, a, b, executor.block_index(key)) for key, a, b in w.pieces]
        for qn, m in w.users:
            parent_name, _, attr = qn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = kind_of(m)(m, pieces, executor, w.shape, w.dtype)
            setattr(parent, attr, new)
            handle.swaps.append((parent, attr, m, new))
    # the originals let go of their weights (the compressed copies are the truth now)
    for w in weights:
        for _, m in w.users:
            if isinstance(getattr(m, "weight", None), nn.Parameter):
                del m.weight
                m.register_parameter("weight", None)


def _hook(model, weights, roots, executor: Executor, handle: Dispatched) -> None:
    """Enter/exit hooks on block roots; begin/end-of-forward and input placement on the model."""
    from accelerate.utils import send_to_device

    dev = executor.device

    def add(module: nn.Module, b: int) -> None:
        handle.hooks.append(module.register_forward_pre_hook(lambda m, a: executor.enter(b)))
        handle.hooks.append(module.register_forward_hook(lambda m, a, o: executor.exit(b)))

    for r in roots:
        keys = [w.key for w in weights if w.root == r]
        if keys:
            add(model.get_submodule(r), executor.block_index(keys[0]))
    for w in weights:
        if len(w.pieces) > 1:
            continue  # multi-piece weights enter their pieces themselves
        b = executor.block_index(w.pieces[0][0])
        for qn, _ in w.users:
            if w.root is None or not _inside(qn, w.root):
                parent_name, _, attr = qn.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                add(getattr(parent, attr), b)

    def pre(m, args, kwargs):
        executor.begin_forward()
        return send_to_device(args, dev), send_to_device(kwargs, dev)

    handle.hooks.append(model.register_forward_pre_hook(pre, with_kwargs=True))
    handle.hooks.append(model.register_forward_hook(lambda m, a, o: executor.end_forward()))


# ---------------------------------------------------------------------------------------------
# undispatch
# ---------------------------------------------------------------------------------------------


def undispatch(model: nn.Module) -> nn.Module:
    """Back to a plain model: decoded weights as parameters, everything on its original device."""
    handle: Dispatched | None = getattr(model, "neuzip", None)
    if handle is None:
        raise DispatchError("model is not dispatched")
    for h in handle.hooks:
        h.remove()
    if handle.trainer is not None:
        handle.trainer.close()
    ex = handle.executor
    # Before the executor lets go of its memory, each piece as it is held: decoded (resident),
    # or compressed in host memory (host-tier planes stay valid views after close()).
    held = {
        key: ex.weight(key) if ex.tier_of(key) == DEVICE else handle.compressed_tensor(key)
        for w in handle.weights
        for key, _, _ in w.pieces
    }
    ex.close()  # its device memory is free again: pieces decode there one by one
    dev = handle.device
    for w in handle.weights:
        home = w.device if w.device.type != "meta" else torch.device("cpu")  # loaded: host
        parts = []
        for key, _, _ in w.pieces:
            piece = held.pop(key)
            if isinstance(piece, CompressedTensor):
                if dev.type == "cuda" and piece.codec == "ans":  # the GPU decoder, not the host's
                    piece = piece.to(dev)
                piece = decompress(piece, pool=handle.pool)
            parts.append(piece.to(home))
        full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=w.kind.split_dim)
        param = nn.Parameter(full, requires_grad=w.requires_grad)
        for _, m in w.users:
            m.weight = param
    for parent, attr, original, _ in handle.swaps:
        setattr(parent, attr, original)
    for t, device in handle.moved:
        t.data = t.data.to(device)
    del model.neuzip
    return model
