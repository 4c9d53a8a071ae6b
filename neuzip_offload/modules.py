"""Modules whose weights live compressed: they ask the executor for the decoded weight as they run.

A weight is one *piece* or several (row ranges of a Linear or Embedding, column ranges of a
transformers Conv1D), each piece a block of its own, so that a weight larger than a slot streams
through it piece by piece. One-piece weights belong to a block entered by hooks on the block's root
module (a decoder layer, or the module itself); multi-piece weights enter their pieces themselves.
Results are bit-identical to the original module's: the same kernels on the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import saved_weights_redecoded
from .scheduler.executor import Executor

# torch.compile compiles around the compressed modules, which run as they are: their work is the
# executor's (slots, streams, decoders), which a compiled graph must not capture or replay.
_eager = torch.compiler.disable


def refuse_copy():
    raise RuntimeError(
        "a dispatched model cannot be copied (copy.deepcopy, pickle): its weights live "
        "compressed in the runtime's memory. Copy the model before dispatch, or "
        "nzo.undispatch(model), copy, and dispatch each copy"
    )


def refuse_conversion(fn, dtypes: set[torch.dtype], device: torch.device) -> None:
    """Raise if ``fn`` (what ``Module.to``/``.half()``/``.cuda()`` apply to every tensor) would
    change a dtype or the device: only the plain tensors would change, the compressed weights
    cannot, and the model would fail (or differ) later."""
    for dtype in dtypes:
        probe = torch.empty(0, dtype=dtype, device=device)
        out = fn(probe)
        if out.dtype != dtype or out.device != probe.device:
            raise RuntimeError(
                f"a dispatched model stays in {dtype} on {device}: converting it (to "
                f"{out.dtype} on {out.device}) would change its plain tensors only. Convert the "
                "model before dispatch (dispatch(device=...) chooses the device), or "
                "nzo.undispatch(model) first"
            )


@dataclass(frozen=True)
class Piece:
    key: str  # the executor's name for the decoded tensor
    start: int  # range along the split dimension
    stop: int
    block: int  # the executor's block index


class Trainer(Protocol):
    """What a trained weight's module asks of the fused optimizer's runtime (training.py)."""

    def leaf(self, key: str, weight: torch.Tensor) -> torch.Tensor: ...


class CompressedModule(nn.Module):
    """Common part: the executor, the pieces, the original module (kept for undispatch), and
    the trainer when the weight is trained (dispatch(trainable=True))."""

    split_dim = 0
    # pieces are ranges along split_dim (a row piece is a matrix of rows); CompressedExperts:
    # single indices, each piece one expert's matrix (the fused tensor's slice, squeezed)
    per_index = False

    @classmethod
    def piece(cls, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The piece [start, stop) of a weight's values ``t``, a view."""
        if cls.per_index:
            return t.select(cls.split_dim, start)
        return t.narrow(cls.split_dim, start, stop - start)

    @classmethod
    def join(cls, parts: list[torch.Tensor]) -> torch.Tensor:
        """A weight's values from its pieces' (the inverse of ``piece`` over all pieces)."""
        if cls.per_index:
            return torch.stack(parts, dim=cls.split_dim)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=cls.split_dim)

    def __init__(
        self,
        original: nn.Module,
        pieces: list[Piece],
        executor: Executor,
        shape,
        dtype,
        trainer: Trainer | None = None,
    ):
        super().__init__()
        object.__setattr__(self, "_executor", executor)  # not a submodule
        object.__setattr__(self, "_trainer", trainer)
        object.__setattr__(self, "_read_weight", None)  # set by the handle (state_dict)
        object.__setattr__(self, "original", original)
        self.pieces = list(pieces)
        self.weight_shape = torch.Size(shape)
        self.weight_dtype = dtype
        self.bias = getattr(original, "bias", None)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight while its block runs; otherwise a meta tensor of its shape/dtype."""
        if len(self.pieces) == 1:
            try:
                return self._executor.weight(self.pieces[0].key)
            except RuntimeError:
                pass
        return torch.empty(self.weight_shape, dtype=self.weight_dtype, device="meta")

    def _apply(self, fn, *args, **kwargs):
        refuse_conversion(fn, {self.weight_dtype}, self._executor.device)
        return super()._apply(fn, *args, **kwargs)

    def __deepcopy__(self, memo):
        refuse_copy()

    def __reduce_ex__(self, protocol):
        refuse_copy()

    def read_weight_with(self, reader) -> None:
        """``reader(piece keys, module class)`` gives the weight decoded (its pieces joined by the
        class's ``join``), for ``state_dict()``."""
        object.__setattr__(self, "_read_weight", reader)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """``state_dict()`` holds the real weight (decoded on the host, one weight at a time)
        under its usual name, before the bias, as the original module's would."""
        if self._read_weight is None:
            raise RuntimeError(f"{prefix}weight: the compressed module is not attached to a model")
        weight = self._read_weight([p.key for p in self.pieces], type(self))
        if weight is not None:  # None: the caller reads the compressed weights itself
            destination[prefix + "weight"] = weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        if prefix + "weight" in state_dict:
            raise RuntimeError(
                f"load_state_dict cannot replace {prefix}weight: it lives compressed in a "
                "dispatched model. Call nzo.undispatch(model), load the state dict, and dispatch "
                "again; or write the weights with nzo.save_compressed and run them with nzo.load"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def _run(self, piece: Piece, op):
        """``op(weight)`` on a piece's decoded weight. With autograd on, the weight is a trainable
        leaf (when training) and backward decodes it again instead of keeping it.

        The block is entered here when no hook did: gradient checkpointing re-runs a layer's
        forward inside backward without its module hooks (transformers wraps ``forward``)."""
        ex = self._executor
        entered_here = not ex.is_entered(piece.block)
        if entered_here:
            ex.enter(piece.block, predictable=False)
        try:
            w = ex.weight(piece.key)
            if not torch.is_grad_enabled():
                return op(w)
            used = self._trainer.leaf(piece.key, w) if self._trainer is not None else w
            with saved_weights_redecoded(ex, piece.key, w):
                return op(used)
        finally:
            if entered_here:
                ex.exit(piece.block)

    def _over_pieces(self, fn, predictable: bool = True) -> list[torch.Tensor]:
        ex = self._executor
        outs = []
        for p in self.pieces:
            ex.enter(p.block, predictable)
            try:
                outs.append(self._run(p, lambda w, p=p: fn(p, w)))
            finally:
                ex.exit(p.block)
        return outs

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight_shape)}, {self.weight_dtype}, pieces={len(self.pieces)}"


class CompressedLinear(CompressedModule):
    def __init__(self, original: nn.Linear, pieces, executor, shape, dtype, trainer=None):
        super().__init__(original, pieces, executor, shape, dtype, trainer)
        self.in_features = original.in_features
        self.out_features = original.out_features

    @_eager
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.pieces) == 1:
            return self._run(self.pieces[0], lambda w: F.linear(x, w, self.bias))
        b = self.bias
        parts = self._over_pieces(
            lambda p, w: F.linear(x, w, None if b is None else b[p.start : p.stop])
        )
        return torch.cat(parts, dim=-1)


class CompressedConv1D(CompressedModule):
    """transformers' Conv1D (GPT-2): y = x @ W + b with W of shape [in, out]; pieces by column."""

    split_dim = 1

    def __init__(self, original: nn.Module, pieces, executor, shape, dtype, trainer=None):
        super().__init__(original, pieces, executor, shape, dtype, trainer)
        self.nf = original.nf
        self.nx = getattr(original, "nx", shape[0])

    @_eager
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        flat = x.view(-1, x.size(-1))
        if len(self.pieces) == 1:
            y = self._run(self.pieces[0], lambda w: torch.addmm(self.bias, flat, w))
        else:
            b = self.bias
            y = torch.cat(
                self._over_pieces(lambda p, w: torch.addmm(b[p.start : p.stop], flat, w)), dim=-1
            )
        return y.view(size_out)


class CompressedEmbedding(CompressedModule):
    def __init__(self, original: nn.Embedding, pieces, executor, shape, dtype, trainer=None):
        super().__init__(original, pieces, executor, shape, dtype, trainer)
        self.num_embeddings = original.num_embeddings
        self.embedding_dim = original.embedding_dim
        self.padding_idx = original.padding_idx
        self.max_norm = original.max_norm
        self.norm_type = original.norm_type
        self.scale_grad_by_freq = original.scale_grad_by_freq
        self.sparse = original.sparse

    @_eager
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        def lookup(rows_ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.embedding(
                rows_ids,
                w,
                self.padding_idx,
                self.max_norm,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )

        if len(self.pieces) == 1:
            return self._run(self.pieces[0], lambda w: lookup(ids, w))
        return self._lookup_in_pieces(ids)

    def _lookup_in_pieces(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` from a weight cut into row pieces, without a host synchronization.

        Every piece is looked up with the ids moved into its range and clamped to its rows, and
        ``torch.where`` keeps the rows the piece holds: fixed-shape device ops, no ``.tolist()``,
        ``unique`` or boolean indexing, so every piece runs every forward, in order, and joins the
        recorded order (prefetched like a layer). Costs one [*ids, dim] gather and select per
        piece. The first piece is not clamped below and the last not above, so an id outside
        [0, num_embeddings) fails in F.embedding exactly as in nn.Embedding. The rows selected
        are the stored rows, bit for bit; backward gives the rows a piece does not hold a zero
        gradient (the clamped row receives +0.0, which changes no bit of a sum). Gradients are
        dense, as for every piece (``sparse`` applies to whole embeddings)."""
        if torch.is_grad_enabled() and self.scale_grad_by_freq:
            raise NotImplementedError(
                "scale_grad_by_freq=True is not supported for an embedding cut into pieces "
                "(the clamped ids would change the counts); dispatch with a larger "
                "max_block_bytes to keep it whole"
            )
        if self.max_norm is not None:
            raise NotImplementedError(
                "max_norm is not supported for an embedding cut into pieces (it rewrites the "
                "weight in place); dispatch with a larger max_block_bytes to keep it whole"
            )
        last = len(self.pieces) - 1
        ex = self._executor
        out = None
        for i, p in enumerate(self.pieces):
            rows = p.stop - p.start
            local = ids - p.start  # same shape and device as ids: nothing reaches the host
            inside = local.clamp(min=0 if i > 0 else None, max=rows - 1 if i < last else None)
            pad = self.padding_idx
            pad = pad - p.start if pad is not None and p.start <= pad < p.stop else None
            ex.enter(p.block)  # predictable: every piece runs every forward, in order
            try:
                found = self._run(p, lambda w, x=inside, pad=pad: F.embedding(x, w, pad))
            finally:
                ex.exit(p.block)
            if out is None:  # [*ids, dim]; positions of later pieces are overwritten below
                out = found
            else:
                held = ((local >= 0) & (local < rows)).unsqueeze(-1)  # [*ids, 1]
                out = torch.where(held, found, out)
        return out


EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def expert_params(module: nn.Module) -> tuple[str, ...] | None:
    """The fused 3-D expert parameters of a mixture-of-experts module whose forward
    CompressedExperts reproduces (transformers 5's Mixtral / Qwen2-MoE experts: [gate; up]
    concatenated, not transposed, no bias, no norm after each expert), or None."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or not callable(getattr(module, "act_fn", None)):
        return None
    own = dict(module.named_parameters(recurse=False))
    if set(own) != set(EXPERT_PARAMS) or any(p.dim() != 3 or p.shape[0] != n for p in own.values()):
        return None
    layout = {"has_gate": True, "is_concatenated": True, "is_transposed": False}
    if any(getattr(module, k, v) != v for k, v in layout.items()):
        return None
    if getattr(module, "has_bias", False) or getattr(module, "has_post_expert_norm", False):
        return None
    return EXPERT_PARAMS


def routing_of(module: nn.Module) -> tuple[int, int] | None:
    """(experts chosen per token, experts) of a mixture-of-experts module, from its config."""
    top_k = getattr(getattr(module, "config", None), "num_experts_per_tok", None)
    if not isinstance(top_k, int) or top_k < 1:
        return None
    return top_k, module.num_experts


class CompressedExperts(CompressedModule):
    """A mixture-of-experts module whose fused expert tensors live compressed, one block per
    expert: a forward enters only the blocks of the experts its tokens are routed to (the
    router ran before it), so only those are fetched and decoded. The arithmetic is the eager
    experts forward of transformers, op for op: the same results bit for bit.

    While it runs, the next MoE layer's router applied to this layer's input guesses the
    experts the next layer will need, which the executor fetches ahead (``speculate``)."""

    per_index = True

    def __init__(
        self,
        original: nn.Module,
        pieces: dict[str, list[Piece]],
        executor: Executor,
        shapes: dict[str, torch.Size],
        dtype: torch.dtype,
    ):
        first = EXPERT_PARAMS[0]
        super().__init__(original, pieces[first], executor, shapes[first], dtype)
        self.expert_pieces = {attr: list(ps) for attr, ps in pieces.items()}
        self.weight_shapes = dict(shapes)
        self.num_experts = original.num_experts
        self.act_fn = original.act_fn
        routing = routing_of(original)
        self.top_k = routing[0] if routing else None
        # expert e's block: the pieces of every fused tensor at index e share it
        self.expert_blocks = [p.block for p in pieces[first]]
        object.__setattr__(self, "router", None)  # set by attach: a plain [experts, hidden] weight
        object.__setattr__(self, "next_layer", None)  # the next MoE layer's CompressedExperts

    def guess(self, hidden_states: torch.Tensor) -> list[int]:
        """This layer's experts its router would choose for ``hidden_states`` (top_k per token,
        all tokens together)."""
        w = self.router.weight
        logits = F.linear(hidden_states.reshape(-1, w.shape[1]).to(w.dtype), w)
        return sorted(set(logits.topk(self.top_k, dim=-1).indices.flatten().tolist()))

    @_eager
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        ex = self._executor
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()  # the host sync every experts forward makes
        routed = [e for e in hit if 0 <= e < self.num_experts]
        ex.routed([self.expert_blocks[e] for e in routed])
        nxt = self.next_layer
        if nxt is not None and nxt.router is not None and ex.speculating:
            # the guess goes out before this layer's experts run, so that on CUDA its copies
            # and decodes overlap them; a wrong guess costs bandwidth, never a result
            ex.speculate([nxt.expert_blocks[e] for e in nxt.guess(hidden_states)])
        impl = getattr(getattr(self.original, "config", None), "_experts_implementation", None)
        if impl in (None, "eager"):
            return self._eager_loop(hidden_states, top_k_index, top_k_weights, routed)
        return self._own_implementation(impl, hidden_states, top_k_index, top_k_weights, routed)

    def _eager_loop(self, hidden_states, top_k_index, top_k_weights, routed):
        """transformers' eager experts loop, op for op, each expert's weights read in its slot."""
        ex = self._executor
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
        gate_up, down = (self.expert_pieces[a] for a in EXPERT_PARAMS)
        for e in routed:  # ascending, as the eager loop visits them
            top_k_pos, token_idx = torch.where(expert_mask[e])
            current_state = hidden_states[token_idx]
            ex.enter(self.expert_blocks[e], predictable=False)
            try:
                gate, up = self._run(gate_up[e], lambda w, x=current_state: F.linear(x, w)).chunk(
                    2, dim=-1
                )
                current = self.act_fn(gate) * up
                current = self._run(down[e], lambda w, x=current: F.linear(x, w))
            finally:
                ex.exit(self.expert_blocks[e])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states

    def _own_implementation(self, impl, hidden_states, top_k_index, top_k_weights, routed):
        """The model's configured experts function (grouped_mm, batched_mm ...) over the routed
        experts only: their decoded weights stacked (a transient copy of top-k experts per token
        at decode time), the expert ids renumbered in the same order, so that the function does
        the same arithmetic on the same values as over the full tensors."""
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        ex = self._executor
        fn = ALL_EXPERTS_FUNCTIONS.get_interface(impl, None)
        dev, n = hidden_states.device, len(routed)
        stacked = {
            a: torch.empty((n, *s[1:]), dtype=self.weight_dtype, device=dev)
            for a, s in self.weight_shapes.items()
        }
        for i, e in enumerate(routed):
            b = self.expert_blocks[e]
            ex.enter(b, predictable=False)
            try:  # copied out before the slot may serve the next expert
                for a in EXPERT_PARAMS:
                    stacked[a][i].copy_(ex.weight(self.expert_pieces[a][e].key))
            finally:
                ex.exit(b)
        rank = torch.full((self.num_experts + 1,), len(routed), dtype=top_k_index.dtype)
        rank[routed] = torch.arange(len(routed), dtype=top_k_index.dtype)
        view = _ExpertsView(self.original, stacked)
        return fn(view, hidden_states, rank.to(top_k_index.device)[top_k_index], top_k_weights)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """``state_dict()`` holds the fused tensors (decoded on the host, one at a time)."""
        if self._read_weight is None:
            raise RuntimeError(f"{prefix}: the compressed module is not attached to a model")
        for attr, pieces in self.expert_pieces.items():
            value = self._read_weight([p.key for p in pieces], type(self))
            if value is not None:
                destination[prefix + attr] = value
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        for attr in self.expert_pieces:
            if prefix + attr in state_dict:
                raise RuntimeError(
                    f"load_state_dict cannot replace {prefix}{attr}: it lives compressed in a "
                    "dispatched model. Call nzo.undispatch(model), load the state dict, and "
                    "dispatch again"
                )
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{a}={tuple(s)}" for a, s in self.weight_shapes.items())
        return f"{shapes}, {self.weight_dtype}, top_k={self.top_k}"


class _ExpertsView:
    """What an experts function reads of its module, with fewer experts: the original's
    settings and methods, and the given fused tensors (routed experts only)."""

    def __init__(self, original: nn.Module, tensors: dict[str, torch.Tensor]):
        self._original = original
        self.num_experts = next(iter(tensors.values())).shape[0]
        for name, t in tensors.items():
            setattr(self, name, t)
        self._is_expert_parallel = False

    def __getattr__(self, name: str):
        value = getattr(self._original, name)
        if callable(value) and hasattr(value, "__func__"):  # a method: bound to this view
            return value.__func__.__get__(self)
        return value


def kind_of(module: nn.Module) -> type[CompressedModule] | None:
    """The compressed twin of a module whose weight we compress, or None."""
    if isinstance(module, CompressedModule):
        return None
    if isinstance(module, nn.Linear):
        return CompressedLinear
    if isinstance(module, nn.Embedding):
        return CompressedEmbedding
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return CompressedConv1D
    if expert_params(module) is not None and routing_of(module) is not None:
        return CompressedExperts
    return None
