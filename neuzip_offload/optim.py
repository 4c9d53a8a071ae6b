"""Optimizers the runtime fuses into backward: one tensor at a time, as soon as its gradient exists.

    model = nzo.dispatch(model, trainable=True, optimizer=nzo.optim.AdamW(lr=1e-4))
    model.neuzip.optimizer.lr = 5e-5          # schedules change hyper-parameters here

Each update is the same sequence of tensor operations as torch.optim's single-tensor
implementation (``foreach=False``), so a fused step gives the same bits as the unfused one.
Optimizer state lives where ``state_device`` says (the host by default: the GPU then holds only
the working set) in ``state_dtype`` (default: the parameter's dtype, as torch.optim keeps it).
"""

from __future__ import annotations

import torch


class FusedOptimizer:
    """A per-tensor update rule with its state: ``update(key, param, grad)`` changes ``param``."""

    def __init__(self, state_dtype: torch.dtype | None = None, state_device: str = "cpu"):
        if state_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"state_dtype must be None, fp32, bf16 or fp16, got {state_dtype!r}")
        self.state_dtype = state_dtype
        self.state_device = torch.device(state_device)
        self.state: dict[str, dict] = {}

    def update(self, key: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        raise NotImplementedError  # pragma: no cover - the subclasses define it

    def state_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for s in self.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )

    def _buffer(self, key: str, name: str, like: torch.Tensor, init=None) -> torch.Tensor:
        """A state tensor (created on first use), brought to the parameter's device."""
        s = self.state.setdefault(key, {})
        if name not in s:
            dtype = self.state_dtype or like.dtype
            s[name] = (
                torch.zeros_like(like, dtype=dtype, device=self.state_device)
                if init is None
                else init.to(dtype=dtype, device=self.state_device).clone()
            )
        return s[name]

    def _hyper(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("state",)}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self._hyper().items())
        return f"{type(self).__name__}({params})"


class SGD(FusedOptimizer):
    """torch.optim.SGD's update (momentum, dampening, nesterov, weight decay)."""

    def __init__(
        self,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        **kw,
    ):
        super().__init__(**kw)
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def update(self, key: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum != 0:
            s = self.state.setdefault(key, {})
            buf = s.get("momentum_buffer")
            if buf is None:
                buf = self._buffer(key, "momentum_buffer", grad, init=grad.detach())
                local = buf.to(param.device, grad.dtype)
            else:
                local = buf.to(param.device, grad.dtype)
                local.mul_(self.momentum).add_(grad, alpha=1 - self.dampening)
            if local is not buf:
                buf.copy_(local)
            grad = grad.add(local, alpha=self.momentum) if self.nesterov else local
        param.add_(grad, alpha=-self.lr)


class AdamW(FusedOptimizer):
    """torch.optim.AdamW's update (decoupled weight decay, no amsgrad)."""

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        **kw,
    ):
        super().__init__(**kw)
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("lr, eps, weight_decay must be >= 0 and betas in [0, 1)")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay

    def update(self, key: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        s = self.state.setdefault(key, {})
        s["step"] = s.get("step", 0.0) + 1.0  # exact in float32, as torch counts it, to 2**24
        step = s["step"]
        exp_avg_home = self._buffer(key, "exp_avg", param)
        exp_avg_sq_home = self._buffer(key, "exp_avg_sq", param)
        exp_avg = exp_avg_home.to(param.device)
        exp_avg_sq = exp_avg_sq_home.to(param.device)
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
        if exp_avg is not exp_avg_home:
            exp_avg_home.copy_(exp_avg)
            exp_avg_sq_home.copy_(exp_avg_sq)


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
