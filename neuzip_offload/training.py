"""Training with compressed weights: fused per-tensor updates, then re-encoding.

Under autograd a compressed weight is decoded for the forward and is *not* kept for backward:
a saved-tensor hook (autograd.py) replaces it in the graph by a marker, and backward decodes the
weight again (in reverse block order, prefetched like the forward). With ``trainable=True`` each
use of a weight in the forward is a fresh leaf whose post-accumulate-grad hook hands the gradient
to the fused optimizer as soon as autograd has it (LOMO-style: no full set of gradients ever
exists); once every use of the weight in this forward has delivered its part, the update runs on
the decoded weight and the result is re-encoded with fresh frequency tables. Plain parameters
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

import ctypes
import logging
import math
import sys
import threading
import weakref
from concurrent.futures import Executor as ThreadPool
from typing import TYPE_CHECKING

import torch
from torch import nn

from .budget import device_encode_bytes
from .encode import reencode_async
from .optim import StateMover
from .options import TrainOptions
from .scheduler.executor import Executor

if TYPE_CHECKING:  # handle.py imports this module
    from .handle import PieceRecords

log = logging.getLogger(__name__)


class Trainer:
    """The fused optimizer's side of the runtime: leaves, gradient hooks, updates, re-encoding."""

    def __init__(
        self,
        executor: Executor,
        records: PieceRecords,
        options: TrainOptions,
        pool: ThreadPool | None = None,
        plain: list[tuple[str, nn.Parameter]] | None = None,
    ):
        self.executor = executor
        self.records = records  # the handle's: told of updated and re-encoded pieces
        self.pool = pool
        self.optimizer = optimizer = options.optimizer
        self.grad_accum_steps = options.grad_accum_steps
        self.clip_grad_norm = options.clip_grad_norm
        self.clip_mode = options.clip_mode
        self.grad_norm: float | None = None  # global norm of the last applied step
        self._sq: torch.Tensor | None = None  # this backward's sum of squares, on the device
        # Gradients of compressed weights, per key: uses of this forward still to deliver one
        # (live leaves), the sum so far, keys whose sum is complete. Leaves die and hooks run on
        # autograd's threads too: these three change under the lock.
        self._lock = threading.RLock()  # reentrant: a leaf may die (GC) while it is held
        self._live: dict[str, int] = {}
        self._partial: dict[str, torch.Tensor] = {}
        self._ready: list[str] = []
        self._accum: dict[str, torch.Tensor] = {}  # fp32 sums, pinned on the host (CUDA)
        self._micro: dict[str, int] = {}
        # the optimizer's copies go on the executor's copy stream
        optimizer.bind(
            self.executor.streams,
            copies=self.executor.copies,
            params=[p for _, p in plain or []],
            device=self.executor.device,
        )
        self.mover: StateMover = optimizer.mover
        self.steps = 0
        self._hooks = []
        for name, p in plain or []:
            self._hooks.append(
                p.register_post_accumulate_grad_hook(lambda t, name=name: self._on_plain(name, t))
            )
        self._spent: list[nn.Parameter] = []  # plain parameters holding a SpentGrad
        self.executor.on_backward_end.append(self._end_backward)
        self.executor.on_pass_begin.append(self._clear_spent)
        self.executor.on_backward_abandoned.append(self._abandon)

    def close(self) -> None:
        self.mover.synchronize()  # no copy into the state or the planes outlives the trainer
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- the forward side ---------------------------------------------------------------------
    def leaf(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """A trainable leaf over the decoded weight for one use in this forward.

        The update of ``key`` waits for every live use to deliver its gradient; a use whose
        graph is dropped without a backward (a validation loss, a skipped batch) stops counting
        when its leaf dies, and a use whose gradient never comes (the forward that gradient
        checkpointing re-runs inside backward) is settled at the end of the backward."""
        leaf = weight.detach().requires_grad_(True)
        use = _Use(key)
        with self._lock:
            self._live[key] = self._live.get(key, 0) + 1
        leaf.register_post_accumulate_grad_hook(lambda t, use=use: self._on_grad(use, t))
        weakref.finalize(leaf, self._gone, use)
        return leaf

    def _gone(self, use: _Use) -> None:
        """A leaf died (its graph was freed). Runs wherever the last reference went (possibly
        inside autograd): it only counts; updates run from the hooks or the end of backward."""
        with self._lock:
            if use.done:
                return
            use.done = True
            if self._settle(use.key) and use.key in self._partial:
                self._ready.append(use.key)

    def _settle(self, key: str) -> bool:
        """One use of ``key`` is done: whether none is live any more. Under self._lock."""
        left = self._live[key] - 1
        if left:
            self._live[key] = left
            return False
        del self._live[key]
        return True

    # -- gradients arrive -----------------------------------------------------------------------
    def _on_grad(self, use: _Use, leaf: torch.Tensor) -> None:
        grad, leaf.grad = leaf.grad, None
        key = use.key
        with self._lock:
            use.done = True
            part = self._partial.get(key)
            if part is None:
                self._partial[key] = grad
            else:  # as autograd would sum them; in place, the partial sum is ours alone
                part += grad
                del grad
            if self._settle(key):
                self._ready.append(key)
            ready, self._ready = self._ready, []
        for k in ready:
            self._apply_partial(k)

    def _apply_partial(self, key: str) -> None:
        grad = self._partial.pop(key, None)
        if grad is not None:
            self._micro_step(key, grad, self._apply_compressed)

    def _on_plain(self, name: str, param: torch.Tensor) -> None:
        grad, param.grad = param.grad, SpentGrad.like(param)
        self._spent.append(param)
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
        # Sums still waiting for a use that will not deliver in this backward (a forward
        # re-run by gradient checkpointing, a graph kept alive but not backpropagated): this
        # backward's step applies them now, as torch's optimizer.step() after it would.
        with self._lock:
            waiting = list(self._partial)
            self._ready.clear()
        for key in waiting:
            self._apply_partial(key)
        if self._sq is not None:  # an update was applied: one synchronization per step
            self.grad_norm = math.sqrt(float(self._sq))
            self.steps += 1
        self._sq = None
        # The step's device → host copies (optimizer state, sums, re-encoded planes) end shortly
        # after its last update: wait once, so the host may read any of them from here on.
        self.mover.synchronize()
        return_freed_memory()

    def _clear_spent(self) -> None:
        """Before a pass accumulates gradients again, the spent markers go."""
        for p in self._spent:
            if isinstance(p.grad, SpentGrad):
                p.grad = None
        self._spent.clear()

    def _abandon(self) -> None:
        """The backward failed before its end: its partial sums are dropped (never applied)."""
        with self._lock:
            self._partial.clear()
            self._ready.clear()
        self._sq = None

    # -- the update of a compressed weight -------------------------------------------------------
    def _apply_compressed(self, key: str, grad: torch.Tensor) -> None:
        ex = self.executor
        b = ex.block_index(key)
        ex.enter(b, predictable=False)
        try:
            weight = ex.weight(key)
            self.optimizer.update(key, weight, grad)
            ex.updated(key)  # graphs saved before this update refuse backward
            if ex.is_resident(b):
                self.records.keep_decoded(key)  # the decoded tensor is the truth; encode on save
            else:
                old = self.records.like(key)
                # the encoder's scratch is planned (PlanOptions.scratch_bytes) and held here
                scratch = (
                    device_encode_bytes(weight.numel(), weight.element_size())
                    if weight.is_cuda
                    else 0
                )
                with ex.scratch("re-encode", scratch):
                    ct, ready = reencode_async(weight, old, self.mover, self.pool)
                # the executor holds the new planes; the handle keeps the header
                self.records.reencoded(key, ct)
                ex.replace(key, ct, ready=ready)  # its repacking waits for the copy
        finally:
            ex.exit(b)


class SpentGrad(torch.Tensor):
    """What a plain parameter's ``.grad`` holds after the fused optimizer applied it: any use
    raises (``clip_grad_norm_`` over the model, a second optimizer stepping the same tensors)
    instead of silently finding no gradient. ``zero_grad()`` clears it as usual. A zero-stride
    view: no memory."""

    _ALLOWED = frozenset(
        {"__get__", "__set__", "__repr__", "zero_", "detach_", "requires_grad_", "size", "dim"}
    )

    @classmethod
    def like(cls, param: torch.Tensor) -> SpentGrad:
        return (
            torch.zeros((), dtype=param.dtype, device=param.device)
            .expand(param.shape)
            .as_subclass(cls)
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in cls._ALLOWED:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise RuntimeError(
            "this gradient was already applied: a model dispatched with trainable=True updates "
            "each weight inside backward (model.neuzip.optimizer), so no other optimizer may "
            "step its parameters and torch.nn.utils.clip_grad_norm_ finds no gradients. Clip "
            "with dispatch(clip_grad_norm=...); each step's global norm is "
            "model.neuzip.trainer.grad_norm"
        )


class _Use:
    """One use of a compressed weight in a forward: done once it delivered or its leaf died."""

    __slots__ = ("done", "key")

    def __init__(self, key: str):
        self.key = key
        self.done = False


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


_HOST = torch.device("cpu")
