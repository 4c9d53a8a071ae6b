"""Mixture-of-experts weights in a checkpoint: its two layouts, and the names that join them.

Format layer, pure (tensor names and one concatenation). conversion.py, source.py and
loading.py ask it which checkpoint tensors form one expert's piece of a model's fused expert
parameter, and under which names a checkpoint may hold a model's tensor.

A transformers-5 MoE layer holds its experts in one module with two fused parameters:
``<experts>.gate_up_proj`` [E, 2I, H] (row e: expert e's gate rows, then its up rows) and
``<experts>.down_proj`` [E, H, I]. Checkpoints hold them in one of two layouts:

- per expert, as the Hub's Mixtral and Qwen2-MoE files do: ``<experts>.<e>.w1.weight`` (gate,
  [I, H]), ``.w3.weight`` (up, [I, H]), ``.w2.weight`` (down, [H, I]) under Mixtral's
  ``block_sparse_moe`` (the model's ``mlp``); ``<experts>.<e>.gate_proj.weight``,
  ``.up_proj.weight``, ``.down_proj.weight`` for Qwen2-MoE and its kin;
- fused: the two 3-D tensors under the model's names (a transformers-5 state dict).

Compressed, a fused parameter is stored in pieces of one expert each: ``<param>[e]``, the range
(e, e + 1) along dim 0, whose value is ``param[e]`` (2-D). Both layouts give the same pieces:
per expert, gate and up are concatenated along dim 0 one expert at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import CheckpointError

GATE_UP = "gate_up_proj"
DOWN = "down_proj"

# a per-expert tensor's projection → (the fused parameter it joins, its place in the piece)
_PROJECTIONS = {
    "w1": (GATE_UP, 0),  # Mixtral: gate
    "w3": (GATE_UP, 1),  # Mixtral: up
    "w2": (DOWN, 0),
    "gate_proj": (GATE_UP, 0),
    "up_proj": (GATE_UP, 1),
    "down_proj": (DOWN, 0),
}
# the projections of one naming family, in piece order: (gate, up), (down,)
_FAMILIES = {
    "mixtral": {GATE_UP: ("w1", "w3"), DOWN: ("w2",)},
    "qwen2_moe": {GATE_UP: ("gate_proj", "up_proj"), DOWN: ("down_proj",)},
}
_FAMILY_OF = {p: f for f, params in _FAMILIES.items() for ps in params.values() for p in ps}
_PER_EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.(" + "|".join(_PROJECTIONS) + r")\.weight$")
_FUSED = re.compile(rf"^(.+\.experts)\.({GATE_UP}|{DOWN})$")
# checkpoint → model renames (transformers' own on load): Mixtral's Hub names its MoE block
# "block_sparse_moe", the transformers-5 model "mlp"
_RENAMES = ((".block_sparse_moe.", ".mlp."),)


def model_name(name: str) -> str:
    """The model's name for a checkpoint tensor's name (Mixtral's ``block_sparse_moe`` is the
    model's ``mlp``); other names are returned as they are."""
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def checkpoint_names(name: str, prefix: str = "") -> list[str]:
    """The names under which a checkpoint may hold the model's tensor ``name``, in the order to
    try them: the name itself, then with the model's ``base_model_prefix`` dropped or added
    (a base model's checkpoint fills a model with a head, and the other way round), then those
    under the Hub's names (the model's ``mlp`` as Mixtral's ``block_sparse_moe``)."""
    names = [name]
    if prefix:
        head = prefix + "."
        names.append(name[len(head) :] if name.startswith(head) else head + name)
    hub = [n.replace(new, old) for n in names for old, new in _RENAMES if new in n]
    return list(dict.fromkeys(names + hub))


def fused_param(name: str) -> tuple[str, str] | None:
    """(experts module, ``"gate_up_proj"`` or ``"down_proj"``) of a fused expert parameter's
    name (``model.layers.3.mlp.experts.gate_up_proj``), else None."""
    m = _FUSED.match(name)
    return (m.group(1), m.group(2)) if m else None


def piece_key(fused: str, expert: int) -> str:
    """The name of expert ``expert``'s piece of a fused parameter: ``<fused>[<expert>]``."""
    return f"{fused}[{expert}]"


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor a piece is read from: whole, or row ``row`` of a fused tensor."""

    name: str
    row: int | None = None


@dataclass(frozen=True)
class ExpertPiece:
    """Expert ``expert``'s piece of the fused parameter ``fused`` (named as the checkpoint
    prefixes it, renamed to the model's module names), read from ``sources`` concatenated along
    dim 0; ``shape`` is the piece's (2-D), ``count`` the experts of the parameter."""

    fused: str
    expert: int
    count: int
    sources: tuple[Source, ...]
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        return piece_key(self.fused, self.expert)

    @property
    def fused_shape(self) -> tuple[int, ...]:
        """The shape of the whole fused parameter: [count, *shape]."""
        return (self.count, *self.shape)


def merge(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """A piece's value from its sources' tensors: gate rows then up rows (one part: itself)."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=0)


@dataclass(frozen=True)
class ExpertTensors:
    """The experts a checkpoint holds, found in its tensor names (:func:`find_experts`)."""

    pieces: dict[str, tuple[ExpertPiece, ...]]  # fused name → its pieces, expert 0 first
    consumed: frozenset[str]  # the checkpoint tensors the pieces are read from

    def resolve(self, name: str, prefix: str = "") -> str | None:
        """The checkpoint's name (a key of ``pieces``) for the model's fused parameter ``name``,
        with :func:`checkpoint_names`' conventions; None when the checkpoint has none."""
        return next((n for n in checkpoint_names(name, prefix) if n in self.pieces), None)

    def pieces_for(
        self, name: str, shape: Sequence[int], prefix: str = ""
    ) -> tuple[ExpertPiece, ...] | None:
        """The pieces of the model's fused parameter ``name`` of ``shape`` ([E, ...]), expert 0
        first; None when the checkpoint has none. Raises CheckpointError when the checkpoint's
        experts are of another number or shape."""
        found = self.resolve(name, prefix)
        if found is None:
            return None
        pieces = self.pieces[found]
        if pieces[0].fused_shape != tuple(shape):
            raise CheckpointError(
                f"the checkpoint's {found} has {pieces[0].count} experts of shape "
                f"{list(pieces[0].shape)}; the model's {name} is {list(shape)}"
            )
        return pieces

    def expert_bytes(self, itemsize: Mapping[str, int] | int) -> dict[str, int]:
        """Bytes of each expert's block (its pieces of both fused parameters), keyed
        ``<experts>[e]``; ``itemsize``: per source tensor name, or one for all."""
        out: dict[str, int] = {}
        for fused, pieces in self.pieces.items():
            module = fused.rpartition(".")[0]
            for p in pieces:
                size = itemsize if isinstance(itemsize, int) else itemsize[p.sources[0].name]
                key = piece_key(module, p.expert)
                out[key] = out.get(key, 0) + math.prod(p.shape) * size
        return out


def find_experts(shapes: Mapping[str, Sequence[int]]) -> ExpertTensors:
    """The expert pieces a checkpoint holds, from its tensors' names and shapes, in either
    layout. Raises CheckpointError naming the tensor when an expert lacks one of its
    projections, experts of one parameter differ in shape, or a module holds both layouts."""
    per_expert: dict[str, dict[int, dict[str, str]]] = {}  # module → expert → projection → name
    fused: dict[str, str] = {}  # model's fused name → checkpoint name
    for name in shapes:
        m = _PER_EXPERT.match(name)
        if m is not None:
            module, e, proj = m.group(1), int(m.group(2)), m.group(3)
            per_expert.setdefault(module, {}).setdefault(e, {})[proj] = name
            continue
        m = _FUSED.match(name)
        if m is not None and len(shapes[name]) == 3:
            fused[model_name(name)] = name
    pieces: dict[str, tuple[ExpertPiece, ...]] = {}
    consumed: set[str] = set()
    for module, experts in sorted(per_expert.items()):
        for param, found in _per_expert_pieces(module, experts, shapes).items():
            if param in fused:
                raise CheckpointError(
                    f"the checkpoint holds {param} both fused ({fused[param]}) and per expert "
                    f"({found[0].sources[0].name} ...)"
                )
            pieces[param] = found
            consumed.update(s.name for p in found for s in p.sources)
    for param, name in sorted(fused.items()):
        count, *shape = shapes[name]
        pieces[param] = tuple(
            ExpertPiece(param, e, count, (Source(name, e),), tuple(shape)) for e in range(count)
        )
        consumed.add(name)
    return ExpertTensors(dict(sorted(pieces.items())), frozenset(consumed))


def _per_expert_pieces(
    module: str, experts: dict[int, dict[str, str]], shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[ExpertPiece, ...]]:
    """The pieces of one module's per-expert tensors: {fused name: pieces}."""
    some = next(iter(next(iter(experts.values()))))
    family = _FAMILIES[_FAMILY_OF[some]]
    count = max(experts) + 1
    out = {}
    for param, projections in family.items():
        fused = model_name(f"{module}.{param}")
        pieces = []
        for e in range(count):
            names = []
            for proj in projections:
                name = experts.get(e, {}).get(proj)
                if name is None:
                    role = {"w1": "gate", "w3": "up", "w2": "down"}.get(proj, proj.split("_")[0])
                    raise CheckpointError(
                        f"the checkpoint lacks {module}.{e}.{proj}.weight (expert {e}'s {role} "
                        f"projection, part of {piece_key(fused, e)}); it holds "
                        f"{count} experts in {module}"
                    )
                names.append(name)
            rows = sum(shapes[n][0] for n in names)
            shape = (rows, *shapes[names[0]][1:])
            if pieces and shape != pieces[0].shape:
                raise CheckpointError(
                    f"{names[0]}: expert {e} of {fused} has shape {list(shape)}, expert 0 "
                    f"{list(pieces[0].shape)}; a fused parameter's experts must agree"
                )
            pieces.append(ExpertPiece(fused, e, count, tuple(Source(n) for n in names), shape))
        out[fused] = tuple(pieces)
    return out
