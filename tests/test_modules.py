"""The compressed modules (neuzip_offload/modules.py): transformers' Conv1D cut into column pieces.

Linear and Embedding pieces are tested in test_dispatch.py; here a GPT-2 style Conv1D (y = x @ W
+ b with W of shape [in, out]) outside the layers, large enough to be cut by column.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import neuzip_offload as nzo
from neuzip_offload.modules import CompressedConv1D
from neuzip_offload.scheduler.plan import HOST
from tests.helpers import same_bits

OUT = 1000  # the head's output features: 16 pieces of 63 columns, each under a layer's bytes


class _ConvHead(nn.Module):
    """Four small layers (the largest ModuleList: the blocks) and a wide Conv1D head outside
    them, with 15.6 times a layer's bytes."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 64, bias=False), nn.GELU()) for _ in range(4)
        )
        self.head = Conv1D(OUT, 64)
        nn.init.normal_(self.head.bias)  # Conv1D starts at zero: slices of it must show
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _dispatch(model: nn.Module, **kw) -> nn.Module:
    """Dispatched at the smallest budget the planner accepts: blocks stream."""
    with pytest.raises(nzo.PlanError) as e:
        nzo.dispatch(copy.deepcopy(model), max_gpu_mem=1, reserve=0, progress=False, **kw)
    budget = e.value.minimum_device_bytes
    return nzo.dispatch(model, max_gpu_mem=budget, reserve=0, progress=False, **kw)


def _pieces(model: nn.Module) -> list[str]:
    return sorted(k for k in model.neuzip.compressed if k.startswith("head.weight"))


def test_a_conv1d_cut_into_column_pieces_gives_the_same_bits():
    """bf16, as the models this runs: each piece's product is the whole product's columns, bit
    for bit. (Not fp32 on this CPU: MKL's sgemm rounds 63-column products differently from
    the same columns of a 1000-column one, by an ulp.)"""
    dtype = torch.bfloat16
    model = _ConvHead(dtype).eval()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        ref = plain(x)
    _dispatch(model, prefetch=1)
    head = model.head
    assert isinstance(head, CompressedConv1D) and len(head.pieces) > 2
    keys = [f"head.weight[{i}]" for i in range(len(head.pieces))]
    assert _pieces(model) == sorted(keys)
    # column ranges that cover [0, OUT) in order, each piece a block of its own
    assert head.pieces[0].start == 0 and head.pieces[-1].stop == OUT
    assert all(a.stop == b.start for a, b in itertools.pairwise(head.pieces))
    ex = model.neuzip.executor
    assert len({ex.block_index(k) for k in keys}) == len(keys)
    assert HOST in {ex.tier_of(k) for k in keys}  # some pieces really stream
    with torch.no_grad():
        for _ in range(2):  # the second forward runs on the recorded order
            assert same_bits(model(x), ref)
        assert same_bits(model(x[0]), plain(x[0]))  # 2-d input too
    nzo.undispatch(model)
    assert type(model.head) is Conv1D
    assert same_bits(model.head.weight, plain.head.weight)


def test_gradients_flow_through_a_conv1d_in_pieces():
    """Autograd through the pieces (a frozen base, as under LoRA): the input gradient is the sum
    of one product per piece, dy_i @ W_i^T, summed in another order than dy @ W^T, so it agrees
    to fp32 rounding, not bit for bit."""
    model = _ConvHead(torch.float32).eval().requires_grad_(False)
    plain = copy.deepcopy(model)
    _dispatch(model, prefetch=1)
    assert len(model.head.pieces) > 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 64, generator=g)
    dy = torch.randn(3, OUT, generator=g)
    grads = []
    for m in (plain, model):
        xi = x.clone().requires_grad_()
        (m(xi) * dy).sum().backward()
        grads.append(xi.grad)
    assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_training_keeps_a_conv1d_whole_and_is_bit_identical():
    """With trainable=True the head is not cut (its input gradient would be summed piece by
    piece); the fused SGD steps equal torch.optim.SGD's, bit for bit."""
    model = _ConvHead(torch.bfloat16).train()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 64, generator=g).to(torch.bfloat16) for _ in range(3)]
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, foreach=False)
    for x in xs:
        plain(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    _dispatch(model, prefetch=1, trainable=True, optimizer=nzo.optim.SGD(lr=0.1, momentum=0.9))
    assert _pieces(model) == ["head.weight"]
    assert HOST in model.neuzip.plan.tiers  # the layers stream and are re-encoded
    for x in xs:
        model(x).float().square().mean().backward()
    assert model.neuzip.trainer.steps == len(xs)
    nzo.undispatch(model)
    trained = model.state_dict()
    assert set(trained) == set(plain.state_dict())
    for name, a in plain.state_dict().items():
        assert same_bits(a, trained[name]), name
