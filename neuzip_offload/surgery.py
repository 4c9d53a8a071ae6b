"""Module surgery: a model's modules swapped for their compressed twins, hooked to the executor,
and the exact inverse.

Last step of the data path (modules.py runs the blocks). ``attach`` swaps every module whose
weight is compressed for its twin (CompressedLinear, ...) reading that weight from the
executor, lets the originals drop their weights, moves the parameters and buffers that stay
decoded to the device, and adds the hooks: enter/exit on every block root (and on modules
whose weight is a block of its own), begin/end of forward and input placement on the model.
``Attachment.detach`` undoes each of these: hooks removed, the originals given their weights
back (decoded, as parameters), swapped back in, the moved tensors returned to their devices.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .codec import decompress
from .compressed import CompressedTensor
from .model_analysis import Weight, inside
from .modules import (
    CompressedExperts,
    CompressedModule,
    Piece,
    Trainer,
    kind_of,
    refuse_conversion,
    refuse_copy,
)
from .scheduler.executor import Executor


@dataclass
class Attachment:
    """What ``attach`` changed in a model, in the order it changed it: the undo log."""

    weights: list[Weight]  # their users are the original modules, which get them back
    swaps: list[tuple[nn.Module, str, nn.Module, CompressedModule]] = field(default_factory=list)
    moved: list[tuple[torch.Tensor, torch.device]] = field(default_factory=list)
    hooks: list[RemovableHandle] = field(default_factory=list)
    model: Callable[[], nn.Module | None] = lambda: None  # a weak reference to the model

    @property
    def modules(self) -> list[CompressedModule]:
        """The compressed twins now in the model."""
        return [new for _, _, _, new in self.swaps]

    def detach(self, decoded: Mapping[str, torch.Tensor]) -> None:
        """Undo ``attach``: ``decoded`` holds every weight's values (by key), on its home
        device; they become the originals' parameters again."""
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for w in self.weights:
            param = nn.Parameter(decoded[w.key], requires_grad=w.requires_grad)
            for _, m in w.users:
                setattr(m, w.attr, param)
        for parent, attr, original, _ in self.swaps:
            setattr(parent, attr, original)
        for t, device in self.moved:
            t.data = t.data.to(device)
        model = self.model()
        for name in _GUARDED if model is not None else ():
            model.__dict__.pop(name, None)


def attach(
    model: nn.Module,
    weights: list[Weight],
    roots: list[str],
    executor: Executor,
    trainer: Trainer | None = None,
) -> Attachment:
    """Swap, move and hook ``model`` onto ``executor`` (``trainer``: the runtime that trains
    the weights that require grad)."""
    done = Attachment(weights, model=weakref.ref(model))
    _swap_modules(model, weights, executor, trainer, done)
    _move_resident(model, executor.device, done)
    _hook(model, weights, roots, executor, done)
    _guard(model, executor.device)
    return done


_GUARDED = ("_apply", "__deepcopy__")


def _guard(model: nn.Module, device: torch.device) -> None:
    """``model.to(dtype)``, ``.half()``, ``.to(other device)`` and ``copy.deepcopy(model)`` are
    refused at the model itself, before anything changes (instance attributes that shadow the
    class's; ``detach`` removes them). The compressed modules refuse them too, when called on a
    part of the model."""
    bound = model._apply

    def apply(fn, *args, **kwargs):
        refuse_conversion(fn, model_dtypes(model), device)
        return bound(fn, *args, **kwargs)

    object.__setattr__(model, "_apply", apply)
    object.__setattr__(model, "__deepcopy__", lambda memo: refuse_copy())


def model_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {m.weight_dtype for m in model.modules() if isinstance(m, CompressedModule)} or {
        torch.float32
    }


def _module_at(model: nn.Module, qn: str) -> tuple[nn.Module, str]:
    """(parent, attribute) of the module named ``qn``."""
    parent_name, _, attr = qn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _swap_modules(
    model: nn.Module,
    weights: list[Weight],
    executor: Executor,
    trainer: Trainer | None,
    done: Attachment,
) -> None:
    experts: dict[str, list[Weight]] = {}
    for w in weights:
        pieces = [Piece(key, a, b, executor.block_index(key)) for key, a, b in w.pieces]
        if w.kind.per_index:  # the fused tensors of one experts module: one twin for all
            experts.setdefault(w.users[0][0], []).append(w)
            continue
        trains = trainer if w.requires_grad else None
        for qn, m in w.users:
            parent, attr = _module_at(model, qn)
            new = kind_of(m)(m, pieces, executor, w.shape, w.dtype, trains)
            setattr(parent, attr, new)
            done.swaps.append((parent, attr, m, new))
    chain = []
    for qn, fused in experts.items():
        if trainer is not None and any(w.requires_grad for w in fused):
            raise NotImplementedError(
                f"{qn}: training mixture-of-experts weights is not supported yet; freeze them "
                "(requires_grad_(False)) to train the rest of the model"
            )
        parent, attr = _module_at(model, qn)
        m = model.get_submodule(qn)
        pieces = {
            w.attr: [Piece(key, a, b, executor.block_index(key)) for key, a, b in w.pieces]
            for w in fused
        }
        new = CompressedExperts(
            m, pieces, executor, {w.attr: w.shape for w in fused}, fused[0].dtype
        )
        object.__setattr__(new, "router", _router_of(parent, m))
        setattr(parent, attr, new)
        done.swaps.append((parent, attr, m, new))
        chain.append(new)
    for layer, following in itertools.pairwise(chain):
        object.__setattr__(layer, "next_layer", following)  # for the speculative prefetch
    # the originals let go of their weights (the compressed copies are the truth now)
    for w in weights:
        for _, m in w.users:
            if isinstance(getattr(m, w.attr, None), nn.Parameter):
                delattr(m, w.attr)
                m.register_parameter(w.attr, None)


def _router_of(moe: nn.Module, experts: nn.Module) -> nn.Module | None:
    """The router beside an experts module: a sibling whose plain weight is [experts, hidden]
    (transformers' TopKRouter), which the speculative prefetch applies; None if there is none."""
    n = experts.num_experts
    for child in moe.children():
        w = getattr(child, "weight", None)
        if child is experts or isinstance(child, CompressedModule):
            continue
        if isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[0] == n:
            return child
    return None


def _move_resident(model: nn.Module, dev: torch.device, done: Attachment) -> None:
    """Parameters and buffers still in the model (the compressed weights are gone) → device."""
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.device != dev:
            done.moved.append((t, t.device))
            t.data = t.data.to(dev)


# torch.compile: the hooks drive the executor, which runs eagerly (see modules.py)
eager = torch.compiler.disable


def _hook(
    model: nn.Module, weights: list[Weight], roots: list[str], executor: Executor, done: Attachment
) -> None:
    """Enter/exit hooks on block roots; begin/end-of-forward and input placement on the model."""
    from accelerate.utils import send_to_device  # seconds to import: not at `import neuzip_offload`

    dev = executor.device

    def add(module: nn.Module, b: int) -> None:
        done.hooks.append(module.register_forward_pre_hook(eager(lambda m, a: executor.enter(b))))
        # always_call: a forward that raises still leaves its block (its slot is freed)
        done.hooks.append(
            module.register_forward_hook(eager(lambda m, a, o: executor.exit(b)), always_call=True)
        )

    for r in roots:
        keys = [w.key for w in weights if w.root == r]
        if keys:
            add(model.get_submodule(r), executor.block_index(keys[0]))
    for w in weights:
        if len(w.pieces) > 1 or w.kind.per_index:
            continue  # multi-piece weights and experts enter their pieces themselves
        b = executor.block_index(w.pieces[0][0])
        for qn, _ in w.users:
            if w.root is None or not inside(qn, w.root):
                parent, attr = _module_at(model, qn)
                add(getattr(parent, attr), b)

    def pre(m, args, kwargs):
        executor.begin_forward()  # waits while another thread's forward runs (one at a time)
        try:
            return send_to_device(args, dev), send_to_device(kwargs, dev)
        except BaseException:
            executor.end_forward(failed=True)
            raise

    def post(m, args, output):
        # always_call: torch runs it from its exception handler when the forward raised
        executor.end_forward(failed=sys.exc_info()[1] is not None)

    done.hooks.append(model.register_forward_pre_hook(eager(pre), with_kwargs=True))
    done.hooks.append(model.register_forward_hook(eager(post), always_call=True))


def release_device_originals(
    weights: list[Weight], compressed: Mapping[str, CompressedTensor]
) -> Callable[[], None]:
    """A model passed on the GPU lets go of its original weights before the executor allocates
    (the compressed copies are the truth now), so originals and runtime never hold device memory
    together. Returns what puts them back, decoded, if the executor cannot be built."""
    released = []
    for w in weights:
        for _, m in w.users:
            p = getattr(m, w.attr, None)
            if isinstance(p, torch.Tensor) and p.device.type == "cuda" and p.numel():
                released.append((p, w))
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def restore() -> None:
        for p, w in released:
            parts = [decompress(compressed[key]) for key, _, _ in w.pieces]
            full = w.kind.join(parts)
            p.data = full.reshape(w.shape).to(p.device)

    return restore
