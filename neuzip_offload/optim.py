"""Optimizers the runtime fuses into backward: one tensor at a time, as soon as its gradient exists.

    model = nzo.dispatch(model, trainable=True, optimizer=nzo.optim.AdamW(lr=1e-4))
    model.neuzip.optimizer.lr = 5e-5          # schedules change hyper-parameters here

Each update is the same sequence of tensor operations as torch.optim's single-tensor
implementation (``foreach=False``), so a fused step gives the same bits as the unfused one.
Optimizer state lives where ``state_device`` says (the host by default: the GPU then holds only
the working set) in ``state_dtype`` (default: the parameter's dtype, as torch.optim keeps it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import backend

if TYPE_CHECKING:
    from .scheduler.streams import Streams


class StateMover:
    """Moves tensors between their home in host memory and the device, without host waits.

    On CUDA a home is pinned and every copy is ``non_blocking`` on the executor's copy stream
    (``streams``: a scheduler.streams.Streams, the one owner of streams and events), ordered by
    events: the compute stream waits for a host → device copy before using its result, and a
    device → host copy waits for the compute stream's work that produced its source. Only the
    copy stream writes or reads a home after it is made, so the copies of one home run in the
    order they were issued and a home is never overwritten while a copy reads it. The host
    reads a home only after ``synchronize()``. Without streams (an optimizer used on its own)
    the copies go on the current stream.

    A home on the tensor's device is used in place, unless ``copies`` (as the executor's
    option: tests force it on the CPU, where the stand-in streams in checking mode then check
    the order of every copy declared here).
    """

    def __init__(self, streams: Streams | None = None, copies: bool = False):
        self.streams = streams
        self.copies = copies
        self._last: dict[torch.device, object] = {}  # device → event after its last D2H copy

    def in_place(self, home: torch.Tensor, device: torch.device) -> bool:
        """Whether ``home`` itself is the working tensor on ``device`` (no copies)."""
        return home.device == device and not self.copies

    def _copy_stream(self, device: torch.device):
        if self.streams is not None and (self.streams.cuda or device.type == "cpu"):
            return self.streams.copy
        return backend.current_stream(device)

    def _event(self, device: torch.device, name: str):
        if self.streams is not None:
            return self.streams.event(name)
        return backend.new_event(device, name)

    def _declare(self, t: torch.Tensor, stream, write: bool, purpose: str) -> None:
        """Tell the streams' checking mode who touches ``t`` (nothing happens otherwise)."""
        if self.streams is not None:
            (self.streams.write if write else self.streams.read)(t, stream, purpose)

    @staticmethod
    def new_home(
        shape: torch.Size, dtype: torch.dtype, device: torch.device, where: torch.device
    ) -> torch.Tensor:
        """An uninitialised home at ``where`` for a tensor used on ``device`` (pinned when it is
        the host and ``device`` is a GPU, so copies can be asynchronous)."""
        if where.type == "cpu" and device.type == "cuda":
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            return backend.empty_pinned(nbytes).view(dtype).view(shape)
        return torch.empty(shape, dtype=dtype, device=where)

    def fetch(self, home: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``home`` on ``device``: the tensor itself where it is used in place, else a copy,
        which the current stream may use at once (it waits for the copy's event, not the
        host)."""
        if self.in_place(home, device):
            return home
        cuda = device.type == "cuda"
        compute = backend.current_stream(device)
        copy = self._copy_stream(device)
        with backend.on_stream(copy):
            # Allocated from the copy stream's pool, so the copy need not wait for compute work
            # that may still use memory the allocator hands out; record_stream below keeps it
            # from being reused before the compute stream's uses of it have run.
            local = torch.empty(home.shape, dtype=home.dtype, device=device)
            self._declare(home, copy, False, "state home (copy in)")
            self._declare(local, copy, True, "state on the device (copy in)")
            local.copy_(home, non_blocking=cuda)  # pinned → device, after earlier D2H of home
            done = self._event(device, "state fetched")
            done.record(copy)
        compute.wait_event(done)
        if cuda and copy != compute:  # (one stream: its own order suffices)
            local.record_stream(compute)
        self._declare(local, compute, True, "state on the device (update)")
        return local

    def store(self, local: torch.Tensor, home: torch.Tensor) -> None:
        """Write ``local`` (same shape; any dtype, converted on its device) into ``home``."""
        if local is home:
            return
        device = local.device
        if self.in_place(home, device):
            home.copy_(local)
            return
        cuda = device.type == "cuda"
        src = local if local.dtype == home.dtype else local.to(home.dtype)  # on the device
        compute = backend.current_stream(device)
        copy = self._copy_stream(device)
        self._declare(src, compute, True, "state on the device (update)")
        ready = self._event(device, "state updated")
        ready.record(compute)  # src is final once the compute stream's work so far has run
        with backend.on_stream(copy):
            copy.wait_event(ready)
            self._declare(src, copy, False, "state on the device (copy out)")
            self._declare(home, copy, True, "state home (copy out)")
            home.copy_(src, non_blocking=cuda)  # device → pinned host
            done = self._event(device, "state stored")
            done.record(copy)
        if cuda and copy != compute:  # (one stream: its own order suffices)
            src.record_stream(copy)  # its memory is not reused before this copy has read it
        self._last[device] = done

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of a device tensor, made asynchronously into a fresh pinned buffer
        (on the CPU: ``t`` itself, unless ``copies``). Read it on the host only after
        ``synchronize()`` or ``last_event(t.device).synchronize()``."""
        if t.device.type == "cpu" and not self.copies:
            return t
        home = self.new_home(t.shape, t.dtype, t.device, torch.device("cpu"))
        self.store(t, home)
        return home

    def last_event(self, device: torch.device):
        """The event after the last device → host copy from ``device`` (None if none)."""
        return self._last.get(device)

    def synchronize(self) -> None:
        """Host wait until every device → host copy issued so far has finished (one event per
        device: the copies of a device run in order on one stream)."""
        for ev in self._last.values():
            ev.synchronize()
        self._last.clear()


class _Hyper:
    """A hyper-parameter kept where torch keeps it, in ``param_groups[0]`` (so that LR schedulers
    and ``state_dict`` see it), read as an attribute by the update rule."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.param_groups[0][self.name]

    def __set__(self, obj, value) -> None:
        obj.param_groups[0][self.name] = value


class FusedOptimizer(torch.optim.Optimizer):
    """A per-tensor update rule with its state: ``update(key, param, grad)`` changes ``param``.

    A torch optimizer to the code around it: one parameter group holding the hyper-parameters
    (LR schedulers such as LambdaLR, cosine or transformers' ``get_scheduler`` drive ``lr``
    there; after dispatch its params are the model's plain parameters), ``state_dict()`` /
    ``load_state_dict()`` to resume a run, and ``step()`` / ``zero_grad()`` for the usual loop.
    The updates themselves run inside backward, one tensor at a time as its gradient exists:
    ``step()`` has nothing left to do (it runs ``closure`` if given) and ``zero_grad()`` nothing
    to clear. State is keyed by the runtime's tensor names, not by parameters.

    State on the host (``state_device="cpu"``) for a CUDA parameter is pinned and moves with
    asynchronous copies (StateMover); read ``state`` on the host only after ``synchronize()``
    (the trainer calls it at the end of every backward)."""

    def __init__(
        self, defaults: dict, state_dtype: torch.dtype | None = None, state_device: str = "cpu"
    ):
        if state_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"state_dtype must be None, fp32, bf16 or fp16, got {state_dtype!r}")
        # torch wants a parameter to build a group; dispatch replaces it with the plain ones
        super().__init__([torch.zeros(0, requires_grad=True)], defaults)
        self.state_dtype = state_dtype
        self.state_device = torch.device(state_device)
        self.state: dict[str, dict] = {}  # tensor name → its state (torch: parameter → state)
        self.mover = StateMover()
        self._device = torch.device("cpu")  # where the updated tensors live (bind)

    def bind(
        self,
        streams: Streams,
        copies: bool = False,
        params: list[torch.nn.Parameter] | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Copy on the executor's streams (``scheduler.streams.Streams``) from now on;
        ``copies``: as the executor's option (state on the parameter's device moves too);
        ``params``: the model's plain parameters, listed in the parameter group."""
        self.synchronize()
        self.mover = StateMover(streams, copies)
        if params is not None:
            self.param_groups[0]["params"] = list(params)
        if device is not None:
            self._device = device

    def synchronize(self) -> None:
        """Wait (on the host) until the state's copies to the host have finished."""
        self.mover.synchronize()

    def update(self, key: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        raise NotImplementedError  # pragma: no cover - the subclasses define it

    def state_bytes(self) -> int:
        """Bytes of optimizer state held (every tensor of every weight's state)."""
        return sum(
            t.numel() * t.element_size()
            for s in self.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )

    @torch.no_grad()
    def step(self, closure=None):
        """Nothing to apply: each update ran inside backward. Runs ``closure`` (with grad) if
        given and returns its loss, as torch optimizers do."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: the gradients were consumed by the updates during backward."""

    def state_dict(self) -> dict:
        """Hyper-parameters and state (host copies, by tensor name), for ``load_state_dict``."""
        self.synchronize()
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": []}
            for g in self.param_groups
        ]
        state = {
            key: {
                name: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                for name, v in s.items()
            }
            for key, s in self.state.items()
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume: the hyper-parameters and every tensor's state from ``state_dict()``."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError(
                "state_dict must be what this optimizer's state_dict() returned (keys 'state' "
                "and 'param_groups'); a torch.optim state dict is keyed by parameters, which a "
                "fused optimizer does not have"
            )
        groups = state_dict["param_groups"]
        if len(groups) != 1 or set(groups[0]) - {"params"} != set(self.param_groups[0]) - {
            "params"
        }:
            raise ValueError(
                f"state_dict's param_groups do not match {type(self).__name__}'s hyper-parameters"
            )
        self.synchronize()
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
        self.state = {}
        for key, s in state_dict["state"].items():
            mine = self.state[key] = {}
            for name, v in s.items():
                if isinstance(v, torch.Tensor):
                    home = self.mover.new_home(v.shape, v.dtype, self._device, self.state_device)
                    home.copy_(v)
                    v = home
                mine[name] = v

    def _local(
        self, key: str, name: str, like: torch.Tensor, init: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(home, working copy on ``like``'s device) of a state tensor. A new one starts as
        zeros, or as ``init`` rounded to the state dtype; its home is written by ``store``."""
        s = self.state.setdefault(key, {})
        home = s.get(name)
        if home is not None:
            return home, self.mover.fetch(home, like.device)
        dtype = self.state_dtype or like.dtype
        home = self.mover.new_home(like.shape, dtype, like.device, self.state_device)
        s[name] = home
        if self.mover.in_place(home, like.device):  # the home is the working tensor
            return home, (home.zero_() if init is None else home.copy_(init.detach()))
        if init is None:
            return home, torch.zeros(like.shape, dtype=dtype, device=like.device)
        return home, init.detach().to(dtype, copy=True)  # on the device; stored after the update


class SGD(FusedOptimizer):
    """torch.optim.SGD's update (momentum, dampening, nesterov, weight decay)."""

    lr = _Hyper()
    momentum = _Hyper()
    dampening = _Hyper()
    weight_decay = _Hyper()
    nesterov = _Hyper()

    def __init__(
        self,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        **kw,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(defaults, **kw)

    def update(self, key: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum != 0:
            fresh = "momentum_buffer" not in self.state.get(key, {})
            home, buf = self._local(key, "momentum_buffer", grad, init=grad if fresh else None)
            local = buf if buf.dtype == grad.dtype else buf.to(grad.dtype)
            if not fresh:
                local.mul_(self.momentum).add_(grad, alpha=1 - self.dampening)
            self.mover.store(local, home)
            grad = grad.add(local, alpha=self.momentum) if self.nesterov else local
        param.add_(grad, alpha=-self.lr)


class AdamW(FusedOptimizer):
    """torch.optim.AdamW's update (decoupled weight decay, no amsgrad)."""

    lr = _Hyper()
    betas = _Hyper()
    eps = _Hyper()
    weight_decay = _Hyper()

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        **kw,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("lr, eps, weight_decay must be >= 0 and betas in [0, 1)")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(defaults, **kw)

    def update(self, key: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        s = self.state.setdefault(key, {})
        s["step"] = s.get("step", 0.0) + 1.0  # exact in float32, as torch counts it, to 2**24
        step = s["step"]
        exp_avg_home, exp_avg = self._local(key, "exp_avg", param)
        exp_avg_sq_home, exp_avg_sq = self._local(key, "exp_avg_sq", param)
        target = param
        if exp_avg.dtype != param.dtype:  # wider states: update a wide copy, round once
            param, grad = param.to(exp_avg.dtype), grad.to(exp_avg.dtype)
        if self.weight_decay != 0:
            param.mul_(1 - self.lr * self.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = self.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if param is not target:
            target.copy_(param)
        self.mover.store(exp_avg, exp_avg_home)
        self.mover.store(exp_avg_sq, exp_avg_sq_home)


SUPPORTED = (SGD, AdamW)


def check(optimizer: object) -> FusedOptimizer:
    if not isinstance(optimizer, FusedOptimizer):
        names = ", ".join(f"neuzip_offload.optim.{c.__name__}" for c in SUPPORTED)
        raise TypeError(
            f"optimizer={type(optimizer).__name__} cannot be fused into backward; use one of "
            f"{names} (for LoRA adapters, any torch optimizer works: dispatch the frozen base "
            "without trainable=True)"
        )
    return optimizer
