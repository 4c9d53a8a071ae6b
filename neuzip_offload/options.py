"""The options of one dispatch, load or plan: validated once, at the boundary, into frozen objects.

dispatch(), load() and plan_model() take keyword arguments from the user; each builds one
:class:`DispatchOptions` (devices, budgets, codec settings, planner rates, block granularity)
and, for ``trainable=True``, one :class:`TrainOptions`. Everything after that reads these
objects: sizes are bytes, the device is a ``torch.device``, the codec is resolved for the
device that decodes. Every error names the argument, the value and what was expected; a budget
larger than the machine's memory is warned about (``warnings``: the user must act on it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import budget
from .calibrate import DecodeRate
from .config import CodecConfig
from .optim import FusedOptimizer, check

GRANULARITIES = ("layer", "module", "linear")
CLIP_MODES = ("tensor", "lagged")


class DispatchError(ValueError):
    """A model or an option that dispatch cannot take, with the reason."""


Size = int | float | str


def device_budget(max_gpu_mem: Size | None, device: torch.device) -> int:
    """Bytes the runtime may hold on ``device``: as given, else 90% of the free CUDA memory,
    else (the CPU backend) the host budget."""
    if max_gpu_mem is not None:
        return budget.parse_size(max_gpu_mem, "max_gpu_mem")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return budget.host_available()


def _one_gpu(
    max_gpu_mem: Size | dict[int, Size] | None, device: torch.device | str | None
) -> tuple[Size | None, torch.device | str | None]:
    """accelerate's ``{index: size}`` form of a budget: one entry names the GPU and its budget
    (the device becomes ``cuda:index``); several are refused."""
    if not isinstance(max_gpu_mem, dict):
        return max_gpu_mem, device
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in max_gpu_mem):
        raise DispatchError(
            f"max_gpu_mem={max_gpu_mem!r}: a key must be a GPU index (an int >= 0), as in "
            "accelerate's max_memory; host memory is max_cpu_mem"
        )
    if len(max_gpu_mem) != 1:
        raise DispatchError(
            f"max_gpu_mem={max_gpu_mem!r}: several GPUs are not supported yet; pass the budget "
            "of one GPU, e.g. max_gpu_mem='8GB' (and device='cuda:1' to choose which)"
            if max_gpu_mem
            else "max_gpu_mem={} names no GPU; pass a budget such as max_gpu_mem='8GB'"
        )
    ((index, size),) = max_gpu_mem.items()
    gpu = torch.device("cuda", index)
    if device is not None and torch.device(device) not in (gpu, torch.device("cuda")):
        raise DispatchError(
            f"max_gpu_mem={max_gpu_mem!r} names GPU {index}, but device={str(device)!r}; pass "
            f"device='cuda:{index}' or a plain budget such as max_gpu_mem={size!r}"
        )
    return size, gpu


def _warn_beyond(name: str, nbytes: int, total: int, what: str) -> None:
    """Warn (at the user's call of dispatch/load/plan_model) about a budget no plan can use."""
    if nbytes > total:
        warnings.warn(
            f"{name}={budget.format_size(nbytes)} is more than {what} "
            f"({budget.format_size(total)}): a plan made for it will not fit here",
            stacklevel=5,  # this, _check_machine, build, dispatch/load/plan_model, the user
        )


def _check_machine(opts: DispatchOptions, cuda_target_here: bool) -> None:
    """Budgets beyond this machine: the host's RAM, and the device's memory where it is here
    (a CUDA target that is not here, for plan_model, cannot be checked)."""
    host = budget.host_total()
    _warn_beyond("max_cpu_mem", opts.host_bytes, host, "this machine's memory")
    if opts.device.type == "cpu":
        _warn_beyond("max_gpu_mem", opts.device_bytes, host, "this machine's memory")
    elif opts.device.type == "cuda" and cuda_target_here:
        total = torch.cuda.get_device_properties(opts.device).total_memory
        _warn_beyond("max_gpu_mem", opts.device_bytes, total, f"the memory of {opts.device}")


def _positive(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DispatchOptions:
    """Where and how a model runs. Build it with :meth:`build` (which validates)."""

    device: torch.device
    codec: CodecConfig  # resolved for ``device`` (codec is never None)
    device_bytes: int
    host_bytes: int
    prefetch: int
    reserve: int | str | None  # bytes, "auto" (estimated from the model's config) or None (0)
    pcie_gbps: float
    disk_gbps: float
    decode_rate: DecodeRate
    target_bits: float | None = None  # lossy widths chosen per tensor (neuzip_offload/mixed.py)
    max_block_bytes: int | None = None  # weights outside the layers larger than this are cut
    granularity: str = "auto"
    progress: bool = True
    log_events: bool = True
    # experts guessed for the next MoE layer are fetched ahead (resolved: on CUDA only)
    speculate: bool = True

    @classmethod
    def build(
        cls,
        max_gpu_mem: Size | dict[int, Size] | None = None,
        *,
        max_cpu_mem: Size | None = None,
        mode: str = "lossless",
        mantissa_bits: int = 3,
        block_size: int = 512,
        codec: str | None = None,
        target_bits: float | None = None,
        prefetch: int = 2,
        reserve: int | str | None = "auto",
        device: torch.device | str | None = None,
        pcie_gbps: float = 25.0,
        disk_gbps: float = 3.0,
        decode_gbps: float | None = None,
        max_block_bytes: int | str | None = None,
        granularity: str = "auto",
        progress: bool = True,
        log_events: bool = True,
        target_only: bool = False,
        speculate: bool | None = None,
    ) -> DispatchOptions:
        """Validate the user's arguments. ``target_only``: ``device`` only names the target of a
        plan (plan_model), so it need not be present; it defaults to CUDA then.
        ``max_gpu_mem`` may be ``{index: size}`` for one GPU (accelerate's form)."""
        max_gpu_mem, device = _one_gpu(max_gpu_mem, device)
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        if speculate is not None and not isinstance(speculate, bool):
            raise ValueError(f"speculate must be True, False or None, got {speculate!r}")
        if target_bits is not None:
            if mode != "lossy":
                raise ValueError("target_bits chooses lossy mantissa widths: pass mode='lossy'")
            if not isinstance(target_bits, (int, float)) or not 2.0 <= target_bits <= 16.0:
                raise ValueError(f"target_bits must be a number in 2..16, got {target_bits!r}")
        pcie, disk = _positive("pcie_gbps", pcie_gbps), _positive("disk_gbps", disk_gbps)
        if device is None:
            device = "cuda" if target_only or torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if not target_only and dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(dev)!r}, but CUDA is not available")
        cfg = CodecConfig(
            mode=mode, codec=codec, mantissa_bits=mantissa_bits, block_size=block_size
        ).for_device(dev)
        if dev.type == "cpu" and codec == "ans" and not target_only:
            warnings.warn(
                "codec='ans' is the GPU's codec: the CPU decodes it about 10x slower than zstd "
                "(the CPU's default); leave codec unset for CPU inference",
                stacklevel=3,
            )
        if dev.type == "cuda" and cfg.codec == "zstd":
            raise ValueError(
                "codec='zstd' decodes on the host, which would stall every block on a GPU; use "
                "codec='ans' (the default on CUDA), or device='cpu'"
            )
        if granularity != "auto" and granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if reserve is not None and reserve != "auto":
            reserve = budget.parse_size(reserve, "reserve")
        host = (
            budget.parse_size(max_cpu_mem, "max_cpu_mem")
            if max_cpu_mem is not None
            else budget.host_available()
        )
        opts = cls(
            device=dev,
            codec=cfg,
            device_bytes=device_budget(max_gpu_mem, dev),
            host_bytes=host,
            prefetch=prefetch,
            # a guess pays where its copy and decode overlap compute (side streams); on the CPU
            # backend decoding happens at request time, so a wrong guess is pure extra work
            speculate=dev.type == "cuda" if speculate is None else speculate,
            reserve=reserve,
            pcie_gbps=pcie,
            disk_gbps=disk,
            decode_rate=(
                DecodeRate.given(decode_gbps)
                if decode_gbps is not None
                else DecodeRate.default(dev)
            ),
            target_bits=target_bits,
            max_block_bytes=(
                budget.parse_size(max_block_bytes, "max_block_bytes")
                if max_block_bytes is not None
                else None
            ),
            granularity=granularity,
            progress=progress,
            log_events=log_events,
        )
        here = dev.type == "cuda" and torch.cuda.is_available()
        _check_machine(opts, here and (dev.index or 0) < torch.cuda.device_count())
        return opts

    @property
    def encode_budget(self) -> int | None:
        """The device budget that compression on the GPU must respect (None: encode on the
        host)."""
        return self.device_bytes if self.device.type == "cuda" else None


@dataclass(frozen=True)
class TrainOptions:
    """``dispatch(trainable=True)``: the fused optimizer and how its steps are taken (see
    neuzip_offload/training.py)."""

    optimizer: FusedOptimizer
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    clip_mode: str = "tensor"

    @classmethod
    def build(
        cls,
        mode: str,
        optimizer: object,
        grad_accum_steps: int = 1,
        clip_grad_norm: float | None = None,
        clip_mode: str = "tensor",
    ) -> TrainOptions:
        if mode == "lossy":
            raise ValueError(
                "trainable=True needs mode='lossless': lossy weights are for inference (an "
                "update smaller than the dropped mantissa bits would be lost on re-encoding)"
            )
        if optimizer is None:
            raise ValueError(
                "trainable=True needs optimizer=neuzip_offload.optim.SGD(...) or AdamW(...)"
            )
        return cls(check(optimizer), grad_accum_steps, clip_grad_norm, clip_mode)

    def __post_init__(self) -> None:
        n = self.grad_accum_steps
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1, got {n!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm!r}")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {self.clip_mode!r}")
