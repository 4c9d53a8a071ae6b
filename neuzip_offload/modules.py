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
        """``reader(piece keys, split dim)`` gives the weight decoded, for ``state_dict()``."""
        object.__setattr__(self, "_read_weight", reader)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """``state_dict()`` holds the real weight (decoded on the host, one weight at a time)
        under its usual name, before the bias, as the original module's would."""
        if self._read_weight is None:
            raise RuntimeError(f"{prefix}weight: the compressed module is not attached to a model")
        weight = self._read_weight([p.key for p in self.pieces], self.split_dim)
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
    return None
