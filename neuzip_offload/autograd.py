"""Weights that backward decodes again instead of keeping: the saved-tensor hooks.

Under autograd a decoded weight would stay alive until backward (saved for the input gradient
of a matrix product, say), so every block's weights would pile up beside the budget. Within a
compressed module's use of its weight (modules.py), tensors saved for backward that view the
weight are replaced by small markers; backward turns a marker back into the weight by asking
the executor to decode it again (``Executor.backward_weight``: in reverse block order,
prefetched like the forward). Inference under autograd and training (training.py) both rely on
it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .scheduler.executor import Executor


class _Saved:
    """What the graph keeps instead of a decoded weight: its key, the view it saved, and the
    weight's version then (a training step after it makes the graph stale)."""

    __slots__ = ("key", "offset", "size", "stride", "version")

    def __init__(self, key: str, size, stride, offset: int, version: int):
        self.key, self.size, self.stride, self.offset = key, size, stride, offset
        self.version = version


@contextlib.contextmanager
def saved_weights_redecoded(executor: Executor, key: str, weight: torch.Tensor) -> Iterator[None]:
    """Within the block: tensors saved for backward that view ``weight`` are replaced by markers,
    which backward turns back into the weight by decoding it again."""
    start = weight.data_ptr()
    end = start + weight.numel() * weight.element_size()
    item = weight.element_size()

    version = executor.version(key)

    def pack(t: torch.Tensor):
        if start <= t.data_ptr() < end and t.dtype == weight.dtype:
            return _Saved(key, t.size(), t.stride(), (t.data_ptr() - start) // item, version)
        return t

    def unpack(obj):
        if not isinstance(obj, _Saved):
            return obj
        if executor.version(obj.key) != obj.version:
            # torch refuses the same ("modified by an inplace operation"); decoding the new
            # weight instead would give gradients of weights the forward never used
            executor.abandon_backward()
            raise RuntimeError(
                f"weight {obj.key!r} was updated after the forward that saved it (by the step "
                "of a later backward, or of this graph's own first backward with "
                "retain_graph=True): this graph is stale. Backpropagate each loss once, before "
                "the next step; compute losses you do not train on under torch.no_grad()"
            )
        w = executor.backward_weight(obj.key)
        return w.as_strided(obj.size, obj.stride, w.storage_offset() + obj.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
