"""The fused optimizers (neuzip_offload/optim.py) against torch.optim, beyond the parameter dtype.

The plain-dtype cases (state in the parameter's dtype) are in test_training.py, where a fused
step is bit-identical to torch.optim's. Here: AdamW with wider state than the weights.
"""

from __future__ import annotations

import copy

import torch

import neuzip_offload as nzo
from neuzip_offload.scheduler.plan import HOST
from tests.helpers import model_bytes, same_bits, tiny_llama


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (2, 12), generator=g) for _ in range(n)]


def test_adamw_with_fp32_state_on_bf16_weights_is_torch_adamw_on_widened_weights():
    """optim.AdamW(state_dtype=torch.float32) on bf16 weights keeps exp_avg and exp_avg_sq in
    fp32 and, each step, widens the weight and its gradient to fp32 (exact), runs AdamW's update
    there and rounds the weight back to bf16 once. The oracle is torch.optim.AdamW
    (foreach=False) run on fp32 copies of a plain model's weights, refreshed from the bf16
    weights before every step and rounded back after it: the same arithmetic, so the same bits
    (weights, losses, and the fp32 state itself)."""
    base = tiny_llama(layers=2).train()  # bf16
    plain, model = copy.deepcopy(base), copy.deepcopy(base)
    batches = _batches(3)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2)

    wide = {n: p.detach().float().requires_grad_() for n, p in plain.named_parameters()}
    opt = torch.optim.AdamW(wide.values(), foreach=False, **hyper)
    ref_losses = []
    for b in batches:
        loss = plain(b, labels=b).loss
        loss.backward()
        ref_losses.append(loss.item())
        with torch.no_grad():
            for n, p in plain.named_parameters():
                wide[n].copy_(p)  # the bf16 weight, widened (exact)
                wide[n].grad = p.grad.float()
            opt.step()
            for n, p in plain.named_parameters():
                p.copy_(wide[n])  # rounded to bf16, to nearest even
                p.grad = None

    nzo.dispatch(
        model,
        max_gpu_mem=int(0.7 * model_bytes(base)),
        reserve=0,
        prefetch=1,
        trainable=True,
        optimizer=nzo.optim.AdamW(state_dtype=torch.float32, **hyper),
        progress=False,
    )
    assert HOST in model.neuzip.plan.tiers  # streamed weights are re-encoded after each step
    losses = []
    for b in batches:
        loss = model(b, labels=b).loss
        loss.backward()
        losses.append(loss.item())
    assert losses == ref_losses

    state = model.neuzip.optimizer.state
    checked = 0
    for n, p in wide.items():
        if n not in state:  # a weight cut into pieces keeps its state per piece
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            ours = state[n][k]
            assert ours.dtype == torch.float32, (n, k)
            assert same_bits(ours.view(p.shape), opt.state[p][k]), (n, k)
        checked += 1
    assert checked >= 10
    nzo.undispatch(model)
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert a.dtype == torch.bfloat16 and same_bits(a, b), name
    # the wide state mattered: bf16 state (torch's AdamW on the bf16 weights) ends elsewhere
    narrow = copy.deepcopy(base)
    opt = torch.optim.AdamW(narrow.parameters(), foreach=False, **hyper)
    for b in batches:
        narrow(b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not all(
        same_bits(a, b) for a, b in zip(narrow.parameters(), plain.parameters(), strict=True)
    )


def test_state_bytes_counts_the_state_held():
    opt = nzo.optim.AdamW(lr=1e-3)
    p = torch.zeros(10, 4)
    opt.update("w", p, torch.ones(10, 4))
    assert opt.state_bytes() == 2 * p.numel() * p.element_size()  # exp_avg and exp_avg_sq
