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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import budget as _budget
from .codec import compress_many, decompress
from .compressed import CompressedTensor
from .config import CodecConfig
from .modules import CompressedModule, Piece, kind_of
from .scheduler.executor import BlockData, Executor
from .scheduler.plan import BlockSpec, Plan, PlanOptions, make_plan
from .scheduler.tiers import PackedLayout, slot_layout

log = logging.getLogger(__name__)

CPU_DECODE_GBPS = 1.5  # zstd on 2 cores, merge included (BENCHMARKS.md)
GPU_DECODE_GBPS = 800.0


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


def _weights(model: nn.Module) -> dict[int, _Weight]:
    """Every compressible weight, once, with all modules that use it (tied weights: several)."""
    found: dict[int, _Weight] = {}
    for qn, m in model.named_modules():
        kind = kind_of(m)
        w = getattr(m, "weight", None)
        if kind is None or not isinstance(w, torch.Tensor) or w.dim() != 2:
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
    pool: ThreadPoolExecutor | None = None
    mantissa_bits: dict[str, int | None] = field(default_factory=dict)

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


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "neuzip"):
        raise DispatchError("model is already dispatched; call neuzip_offload.undispatch(model)")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise DispatchError(
            "model has weights on the meta device and no checkpoint to fill them from; load "
            "the weights first"
        )
    return model


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
    pcie_gbps: float = 25.0,
    max_block_bytes: int | str | None = None,
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
    max_block_bytes: weights outside the layers larger than this are cut into pieces
        (default: the largest layer's size).
    """
    _check_model(model)
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
    if target_bits is not None:
        if mode != "lossy":
            raise ValueError("target_bits chooses lossy mantissa widths: pass mode='lossy'")
        if not isinstance(target_bits, (int, float)) or not 2.0 <= target_bits <= 16.0:
            raise ValueError(f"target_bits must be a number in 2..16, got {target_bits!r}")
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
    device_bytes = _device_budget(max_gpu_mem, dev)
    host_bytes = (
        _budget.parse_size(max_cpu_mem, "max_cpu_mem")
        if max_cpu_mem is not None
        else _budget.host_available()
    )

    weights = list(_weights(model).values())
    if not weights:
        raise DispatchError(
            "model has no Linear, Embedding or Conv1D weights to compress; nothing to dispatch"
        )
    for w in weights:
        if w.param.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise DispatchError(f"{w.key} has dtype {w.param.dtype}; expected bf16, fp16 or fp32")
        for _, m in w.users:
            if isinstance(m, nn.Embedding) and m.max_norm is not None:
                raise DispatchError(f"{w.key}: Embedding(max_norm=...) rewrites its weight")

    roots = _layer_roots(model)
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
    _cut_pieces(weights, limit)

    # compression (on the host), then the plan
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    if target_bits is None:
        bits: dict[str, int | None] = {}
        compressed = _compress(weights, cfg, bits, pool, progress)
    else:
        bits, compressed = _compress_to_target(
            model, weights, cfg, target_bits, calibration, pool, progress
        )
    resident = _resident_bytes(model, weights)
    for w in weights:
        w.param = None  # the compressed copies are the truth now
    blocks, specs = _blocks(weights, compressed, dev)
    res = _reserve(reserve, model, dev, device_bytes)
    options = PlanOptions(
        device_bytes=device_bytes,
        host_bytes=host_bytes,
        reserve_bytes=res,
        resident_bytes=resident,
        prefetch=prefetch,
        copies=dev.type == "cuda",
        pcie_gbps=pcie_gbps,
        decode_gbps=GPU_DECODE_GBPS if dev.type == "cuda" else CPU_DECODE_GBPS,
        device=str(dev),
    )
    plan = make_plan(specs, options)
    log.info("neuzip plan:\n%s", plan)

    executor = Executor(plan, blocks, dev, pool=pool, log_events=log_events)
    handle = Dispatched(
        plan, executor, dev, cfg, compressed, weights, [], pool=pool, mantissa_bits=bits
    )
    _swap_modules(model, weights, executor, handle)
    _move_resident(model, dev, handle)
    _hook(model, weights, roots, executor, handle)
    model.neuzip = handle
    return model


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


def _cut_pieces(weights: list[_Weight], limit: int) -> None:
    """Row (or, for Conv1D, column) pieces for weights outside the layers larger than ``limit``."""
    for w in weights:
        nbytes = w.nbytes
        dim = w.kind.split_dim
        length = w.shape[dim]
        split_dims = {kind_of(m).split_dim for _, m in w.users}
        if w.root is not None or limit <= 0 or nbytes <= limit or length < 2 or len(split_dims) > 1:
            w.pieces = [(w.key, 0, length)]
            continue
        count = min(length, math.ceil(nbytes / limit))
        step = math.ceil(length / count)
        w.pieces = [
            (f"{w.key}[{i}]", a, min(a + step, length))
            for i, a in enumerate(range(0, length, step))
        ]


def _config_for(cfg: CodecConfig, k) -> CodecConfig:
    """The settings for one tensor: the dispatch's, or its chosen width (None: lossless)."""
    if k == "default":
        return cfg
    if k is None:
        return CodecConfig(mode="lossless", codec=cfg.codec)
    return CodecConfig(mode="lossy", codec=cfg.codec, mantissa_bits=k, block_size=cfg.block_size)


def _compress(weights, cfg: CodecConfig, bits, pool, progress: bool) -> dict[str, CompressedTensor]:
    """Every piece, compressed on the host, in batches of one setting (with a progress bar)."""
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
            batch, n = [], 0
            while jobs and (not batch or n < batch_limit):
                w, key, a, b = jobs.pop(0)
                t = w.param.detach()
                if len(w.pieces) > 1:
                    t = t.narrow(w.kind.split_dim, a, b - a)
                batch.append((key, t.cpu()))
                n += t.numel()
            cts = compress_many([t for _, t in batch], c, names=[k for k, _ in batch], pool=pool)
            for (key, t), ct in zip(batch, cts, strict=True):
                out[key] = ct
                bar.update(t.numel())
    bar.close()
    return out


def _compress_to_target(model, weights, cfg, target_bits, calibration, pool, progress):
    """Mixed k per tensor (neuzip_offload/mixed.py), checked against the real compressed size."""
    from .mixed import MixedPrecision

    mp = MixedPrecision(
        model, [(w.key, w.param) for w in weights], cfg.block_size, calibration, progress
    )
    total = sum(w.shape.numel() for w in weights)
    target = target_bits
    bits = mp.allocate(target)
    compressed = _compress(weights, cfg, bits, pool, progress)
    for _ in range(4):
        actual = 8 * sum(ct.nbytes for ct in compressed.values()) / total
        if actual <= target_bits:
            break
        target -= actual - target_bits + 1e-3  # the estimate was short: aim lower
        new = mp.allocate(target)
        changed = [w for w in weights if new[w.key] != bits[w.key]]
        bits = new
        compressed.update(_compress(changed, cfg, bits, pool, progress=False))
    return bits, compressed


def _blocks(weights, compressed, dev: torch.device) -> tuple[list[BlockData], list[BlockSpec]]:
    """BlockData for the executor and BlockSpec for the planner, in module order."""
    items: list[tuple[str, list[str], int]] = []  # (name, keys, uses per forward)
    seen_roots: set[str] = set()
    for w in weights:
        if w.root is None:
            items.extend((key, [key], len(w.users)) for key, _, _ in w.pieces)
        elif w.root not in seen_roots:
            seen_roots.add(w.root)
            items.append((w.root, [v.key for v in weights if v.root == w.root], 1))
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
        data.append(BlockData(name, keys, cts))
        specs.append(
            BlockSpec(
                name,
                sum(ct.numel for ct in cts),
                slot_bytes,
                nbytes,
                ws,
                uses,
                stored_bytes=sum(ct.nbytes for ct in cts),
            )
        )
    return data, specs


def _resident_bytes(model: nn.Module, weights: list[_Weight]) -> int:
    skip = {id(w.param) for w in weights}
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in skip or id(t) in seen:
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
    handle.executor.close()
    for w in handle.weights:
        parts = [decompress(handle.compressed[key], pool=handle.pool) for key, _, _ in w.pieces]
        full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=w.kind.split_dim)
        param = nn.Parameter(full.to(w.device), requires_grad=w.requires_grad)
        for _, m in w.users:
            m.weight = param
    for parent, attr, original, _ in handle.swaps:
        setattr(parent, attr, original)
    for t, device in handle.moved:
        t.data = t.data.to(device)
    if handle.pool is not None:
        handle.pool.shutdown()
    del model.neuzip
    return model
