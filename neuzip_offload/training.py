"""Training with compressed weights: fused per-tensor updates, then re-encoding.

Under autograd a compressed weight is decoded for the forward and is *not* kept for backward:
a saved-tensor hook replaces it in the graph by a marker, and backward decodes the weight again
(in reverse block order, prefetched like the forward). With ``trainable=True`` each use of a
weight in the forward is a fresh leaf whose post-accumulate-grad hook hands the gradient to the
fused optimizer as soon as autograd has it (LOMO-style: no full set of gradients ever exists);
once every use of the weight in this forward has delivered its part, the update runs on the
decoded weight and the result is re-encoded with fresh frequency tables. Plain parameters
(norms, biases) get the same hook and the same optimizer.

Gradient accumulation (``grad_accum_steps=n``) sums each tensor's gradients in an fp32 host
buffer and applies the update on every n-th backward (scale the loss by 1/n for a mean). The sum
is taken on the device: the buffer (pinned on CUDA) comes over, takes the gradient and goes back
with asynchronous copies on the executor's copy stream (optim.StateMover). The device holds one
fp32 sum at a time, beside the gradient, never the sums of all tensors, which the device budget
does not count (they are twice the bf16 weights).

Host synchronization: none per tensor. Re-encoded planes and optimizer state go to pinned host
memory with asynchronous copies; the end of each backward waits once for those copies (after
the global norm, the step's one other wait), so what the host reads afterwards is complete.

Clipping (``clip_grad_norm``): exact global-norm clipping needs every gradient before any update,
which fused updates do not have. ``clip_mode="tensor"`` clips each tensor's gradient to the norm
on its own (exact per tensor); ``"lagged"`` scales every gradient of a step by
min(1, max_norm / global norm of the *previous* step) (exact global clipping whenever the norm
changes slowly from step to step). The global norm of each step is kept in ``grad_norm``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from concurrent.futures import Executor

import torch
from torch import nn

from . import backend
from .budget import device_encode_bytes
from .codec import compress_many
from .compressed import CompressedTensor
from .config import CodecConfig
from .kernels import HAS_TRITON
from .optim import FusedOptimizer, StateMover

log = logging.getLogger(__name__)

CLIP_MODES = ("tensor", "lagged")


class _Saved:
    """What the graph keeps instead of a decoded weight: its key and the view it saved."""

    __slots__ = ("key", "offset", "size", "stride")

    def __init__(self, key: str, size, stride, offset: int):
        self.key, self.size, self.stride, self.offset = key, size, stride, offset


@contextlib.contextmanager
def saved_weights_redecoded(executor, key: str, weight: torch.Tensor) -> Iterator[None]:
    """Within the block: tensors saved for backward that view ``weight`` are replaced by markers,
    which backward turns back into the weight by decoding it again."""
    start = weight.data_ptr()
    end = start + weight.numel() * weight.element_size()
    item = weight.element_size()

    def pack(t: torch.Tensor):
        if start <= t.data_ptr() < end and t.dtype == weight.dtype:
            return _Saved(key, t.size(), t.stride(), (t.data_ptr() - start) // item)
        return t

    def unpack(obj):
        if not isinstance(obj, _Saved):
            return obj
        w = executor.backward_weight(obj.key)
        return w.as_strided(obj.size, obj.stride, w.storage_offset() + obj.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class Trainer:
    """The fused optimizer's side of the runtime: leaves, gradient hooks, updates, re-encoding."""

    def __init__(
        self,
        handle,
        optimizer: FusedOptimizer,
        grad_accum_steps: int = 1,
        clip_grad_norm: float | None = None,
        clip_mode: str = "tensor",
        plain: list[tuple[str, nn.Parameter]] | None = None,
    ):
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        self.handle = handle
        self.executor = handle.executor
        self.optimizer = optimizer
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.clip_mode = clip_mode
        self.grad_norm: float | None = None  # global norm of the last applied step
        self._sq: torch.Tensor | None = None  # this backward's sum of squares, on the device
        self._uses: dict[str, int] = {}
        self._partial: dict[str, torch.Tensor] = {}
        self._accum: dict[str, torch.Tensor] = {}  # fp32 sums, pinned on the host (CUDA)
        self._micro: dict[str, int] = {}
        # the optimizer's copies go on the executor's copy stream
        optimizer.bind(self.executor.streams, copies=self.executor.copies)
        self.mover: StateMover = optimizer.mover
        self.steps = 0
        self._hooks = []
        for name, p in plain or []:
            self._hooks.append(
                p.register_post_accumulate_grad_hook(lambda t, name=name: self._on_plain(name, t))
            )
        self.executor.on_backward_end.append(self._end_backward)

    def close(self) -> None:
        self.mover.synchronize()  # no copy into the state or the planes outlives the trainer
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- the forward side ---------------------------------------------------------------------
    def leaf(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """A trainable leaf over the decoded weight for one use in this forward."""
        leaf = weight.detach().requires_grad_(True)
        self._uses[key] = self._uses.get(key, 0) + 1
        leaf.register_post_accumulate_grad_hook(lambda t, key=key: self._on_grad(key, t))
        return leaf

    # -- gradients arrive -----------------------------------------------------------------------
    def _on_grad(self, key: str, leaf: torch.Tensor) -> None:
        grad, leaf.grad = leaf.grad, None
        part = self._partial.get(key)
        if part is None:
            self._partial[key] = grad
        else:  # as autograd would sum them; in place, the partial sum is ours alone
            part += grad
            del grad
        self._uses[key] -= 1
        if self._uses[key] > 0:
            return
        del self._uses[key]
        self._micro_step(key, self._partial.pop(key), self._apply_compressed)

    def _on_plain(self, name: str, param: torch.Tensor) -> None:
        grad, param.grad = param.grad, None
        self._micro_step(name, grad, lambda key, g: self.optimizer.update(key, param.data, g))

    def _micro_step(self, key: str, grad: torch.Tensor, apply) -> None:
        n = self.grad_accum_steps
        if n > 1:
            count = self._micro.get(key, 0) + 1
            self._micro[key] = count
            home = self._accum.get(key)
            if home is None:
                home = self.mover.new_home(grad.shape, torch.float32, grad.device, _HOST)
                self._accum[key] = home
            if count % n == 1:  # the cycle's first gradient starts the sum
                acc = grad.to(torch.float32)
            else:  # fp32 += fp32(grad), as on the host before: the same bits
                acc = self.mover.fetch(home, grad.device)
                acc.add_(grad)
            if count % n:
                self.mover.store(acc, home)  # the next micro-batch fetches it after this copy
                return
            grad = acc.to(grad.dtype)
        sq = _square_norm(grad)  # stays on the device: no synchronization per tensor
        self._sq = sq if self._sq is None else self._sq + sq
        apply(key, self._clip(grad, sq))

    def _clip(self, grad: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        if self.clip_grad_norm is None:
            return grad
        if self.clip_mode == "tensor":  # min(1, max / norm) on the device; x 1.0 changes no bit
            scale = (self.clip_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            return grad * scale
        norm = self.grad_norm if self.grad_norm is not None else 0.0
        if norm > self.clip_grad_norm:
            return grad * (self.clip_grad_norm / (norm + 1e-6))
        return grad

    def _end_backward(self) -> None:
        if self._sq is not None:  # an update was applied: one synchronization per step
            self.grad_norm = math.sqrt(float(self._sq))
            self.steps += 1
        self._sq = None
        # The step's device → host copies (optimizer state, sums, re-encoded planes) end shortly
        # after its last update: wait once, so the host may read any of them from here on.
        self.mover.synchronize()
        return_freed_memory()

    # -- the update of a compressed weight -------------------------------------------------------
    def _apply_compressed(self, key: str, grad: torch.Tensor) -> None:
        ex = self.executor
        b = ex.block_index(key)
        ex.enter(b, predictable=False)
        try:
            weight = ex.weight(key)
            self.optimizer.update(key, weight, grad)
            if ex.is_resident(b):
                self.handle.dirty.add(key)  # the decoded tensor is the truth; encode on save
            else:
                old = self.handle.compressed[key]
                # the encoder's scratch is planned (PlanOptions.scratch_bytes) and held here
                scratch = (
                    device_encode_bytes(weight.numel(), weight.element_size())
                    if weight.is_cuda
                    else 0
                )
                with ex.scratch("re-encode", scratch):
                    ct, ready = reencode_async(weight, old, self.mover, self.handle.pool)
                # the executor holds the new planes; the handle keeps the header
                self.handle.compressed[key] = ct.placeholder()
                ex.replace(key, ct, ready=ready)  # its repacking waits for the copy
        finally:
            ex.exit(b)


_NORM_PIECE = 1 << 20


def _square_norm(grad: torch.Tensor) -> torch.Tensor:
    """Sum of squares in fp32 (a 0-dim tensor on the gradient's device), a piece at a time: an
    fp32 copy of a whole embedding's gradient would be the largest allocation of the step."""
    total = torch.zeros((), dtype=torch.float32, device=grad.device)
    for piece in grad.reshape(-1).split(_NORM_PIECE):
        p32 = piece.float()
        total += torch.dot(p32, p32)
    return total


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def return_freed_memory() -> None:
    """Hand the heap memory freed during the step back to the OS (glibc keeps it otherwise:
    re-encoding every weight each step leaves many freed blocks, measured +300-500 MB of RSS
    on SmolLM2 without this)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _encode(
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
    ct = _encode(weight, like, pool)
    planes = {k: mover.to_host(p) for k, p in ct.planes.items()}  # fresh buffers: none reused
    moved = [p.device for k, p in ct.planes.items() if planes[k] is not p]
    if not moved:  # a host encode: its planes are complete already
        return ct.with_planes(planes), backend.CpuEvent()
    # the copies of one device run in order on one stream: the last one's event covers all
    return ct.with_planes(planes), mover.last_event(moved[-1])


_HOST = torch.device("cpu")
