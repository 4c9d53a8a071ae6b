"""Training loops as people write them (issue 10): checkpointing, stray forwards, stale graphs.

The oracle is always the same loop on a plain copy of the model with torch.optim, run step for
step beside the dispatched one; the weights must agree bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload.scheduler.plan import HOST
from tests.helpers import model_bytes, same_bits, tiny_llama


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (2, 12), generator=g) for _ in range(n)]


def _pair(tied: bool = False, **dispatch_kw):
    """(plain model, its torch optimizer, dispatched copy) of one fp32 tiny Llama."""
    base = tiny_llama(tied=tied, dtype=torch.float32).train()
    plain, model = copy.deepcopy(base), copy.deepcopy(base)
    opt = torch.optim.SGD(plain.parameters(), lr=1e-2)
    nzo.dispatch(
        model,
        max_gpu_mem=int(0.7 * model_bytes(base)),
        reserve=0,
        trainable=True,
        optimizer=nzo.optim.SGD(lr=1e-2),
        progress=False,
        **dispatch_kw,
    )
    assert HOST in model.neuzip.plan.tiers  # weights stream and are re-encoded each step
    return plain, opt, model


def _step(plain, opt, model, b: torch.Tensor) -> None:
    """One training step on ``b``: torch's loop on the plain copy, a backward on ours."""
    plain(b, labels=b).loss.backward()
    opt.step()
    opt.zero_grad()
    model(b, labels=b).loss.backward()


def _assert_same_weights(plain, model) -> None:
    nzo.undispatch(model)
    ref, got = plain.state_dict(), model.state_dict()
    assert ref.keys() == got.keys()
    differ = [name for name in ref if not same_bits(ref[name], got[name])]
    assert not differ, f"{len(differ)} of {len(ref)} tensors differ from torch: {differ[:4]}"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_trains_every_weight_as_torch_does(reentrant, tied):
    plain, opt, model = _pair(tied)
    kw = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    plain.gradient_checkpointing_enable(**kw)
    model.gradient_checkpointing_enable(**kw)
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    for b in _batches(3):
        _step(plain, opt, model, b)
    moved = [k for k, v in plain.state_dict().items() if not torch.equal(v, start[k])]
    assert "model.layers.0.mlp.down_proj.weight" in moved  # the oracle itself trains the layers
    _assert_same_weights(plain, model)


def test_forwards_without_backward_change_nothing():
    """A validation loss computed with autograd on, and a skipped batch, between steps."""
    plain, opt, model = _pair()
    for i, b in enumerate(_batches(4)):
        for m in (plain, model):
            _ = m(b, labels=b).loss  # validation without torch.no_grad(): the graph is dropped
        if i == 1:
            continue  # a bad batch skipped after its forward
        _step(plain, opt, model, b)
    _assert_same_weights(plain, model)


def test_a_loss_kept_across_a_step_does_not_delay_updates():
    """A graph still alive (a logged loss tensor) when the next step's backward runs."""
    plain, opt, model = _pair()
    kept = []
    for b in _batches(3):
        for m in (plain, model):
            kept.append(m(b, labels=b).loss)  # kept, never backpropagated
        _step(plain, opt, model, b)
    _assert_same_weights(plain, model)


def test_backward_through_a_graph_older_than_the_last_update_is_refused():
    """torch refuses it (the weights were modified in place); so must we, not use new weights."""
    plain, opt, model = _pair()
    b1, b2 = _batches(2)
    first, second = plain(b1, labels=b1).loss, plain(b2, labels=b2).loss
    first.backward()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        second.backward()
    first, second = model(b1, labels=b1).loss, model(b2, labels=b2).loss
    first.backward()
    with pytest.raises(RuntimeError, match="updated after"):
        second.backward()
    del first, second
    for b in _batches(2, seed=1):  # the refused backward left nothing behind: training goes on
        opt.zero_grad()
        plain(b, labels=b).loss.backward()
        opt.step()
        model(b, labels=b).loss.backward()
    _assert_same_weights(plain, model)


def test_a_forward_that_raises_leaves_the_model_usable():
    """Its blocks are left (slots freed) and it records no order; the next step is exact."""
    plain, opt, model = _pair()
    with pytest.raises(IndexError):
        model(torch.tensor([[5, 2000]]))  # an id past the vocabulary, inside the forward
    for b in _batches(2):
        _step(plain, opt, model, b)
    _assert_same_weights(plain, model)


def _adamw_pair():
    base = tiny_llama(dtype=torch.float32).train()
    plain, model = copy.deepcopy(base), copy.deepcopy(base)
    torch_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, foreach=False)
    nzo.dispatch(
        model,
        max_gpu_mem=int(0.7 * model_bytes(base)),
        reserve=0,
        trainable=True,
        optimizer=nzo.optim.AdamW(lr=1e-3),
        progress=False,
    )
    return plain, torch_opt, model


@pytest.mark.parametrize("schedule", ["lambda", "hf-cosine"])
def test_the_usual_loop_with_a_torch_lr_scheduler_matches_torch(schedule):
    from transformers import get_scheduler

    plain, torch_opt, model = _adamw_pair()
    opt = model.neuzip.optimizer
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == 1e-3

    def make(o):
        if schedule == "lambda":
            return torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step))
        return get_scheduler("cosine", o, num_warmup_steps=1, num_training_steps=4)

    scheds = make(torch_opt), make(opt)
    for b in _batches(4):
        for m, o, sch in ((plain, torch_opt, scheds[0]), (model, opt, scheds[1])):
            m(b, labels=b).loss.backward()
            o.step()
            o.zero_grad()
            sch.step()
    assert opt.lr == torch_opt.param_groups[0]["lr"] != 1e-3  # the schedule drove both
    _assert_same_weights(plain, model)


def test_an_optimizer_state_dict_resumes_a_run_exactly():
    plain, torch_opt, model = _adamw_pair()
    batches = _batches(4)
    for b in batches:  # the uninterrupted run
        plain(b, labels=b).loss.backward()
        torch_opt.step()
        torch_opt.zero_grad()
    for b in batches[:2]:
        model(b, labels=b).loss.backward()
    saved_opt = model.neuzip.optimizer.state_dict()
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    nzo.undispatch(model)
    resumed = tiny_llama(dtype=torch.float32).train()
    resumed.load_state_dict(saved_weights)
    nzo.dispatch(
        resumed,
        max_gpu_mem=int(0.7 * model_bytes(plain)),
        reserve=0,
        trainable=True,
        optimizer=nzo.optim.AdamW(lr=0.5),  # overwritten by the state dict
        progress=False,
    )
    resumed.neuzip.optimizer.load_state_dict(saved_opt)
    assert resumed.neuzip.optimizer.lr == 1e-3
    for b in batches[2:]:
        resumed(b, labels=b).loss.backward()
    _assert_same_weights(plain, resumed)


def test_a_second_optimizer_or_clip_grad_norm_over_the_model_is_refused():
    """They would find no gradient (applied in backward already) and do nothing, silently."""
    _, _, model = _adamw_pair()
    b = _batches(1)[0]
    model(b, labels=b).loss.backward()
    with pytest.raises(RuntimeError, match=r"clip_grad_norm=.*grad_norm"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="no other optimizer may step"):
        other.step()
    other.zero_grad()  # the usual loop's zero_grad clears the markers
    model.zero_grad()
    model(b, labels=b).loss.backward()  # and training goes on


def test_backward_twice_through_one_graph_is_refused():
    _, _, model = _adamw_pair()
    b = _batches(1)[0]
    loss = model(b, labels=b).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="updated after"):
        loss.backward()
