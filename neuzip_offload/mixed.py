"""Mixed precision for lossy dispatch: k mantissa bits chosen per tensor (per expert for fused
mixture-of-experts tensors) under a bits budget.

``dispatch(model, mode="lossy", target_bits=7.0)`` keeps the average, headers included, at or
under 7 bits per weight with the least expected loss:

1. Sensitivity: the diagonal Fisher information. A short calibration pass (the token-id tensors
   in ``calibration``, else 4 x 128 random token ids) runs forward and backward on the model's
   language-modelling loss and keeps, for a sample of every weight's rows (whole rows, ≤ 2^18
   weights), the mean squared gradient F. Rounding W to k bits then costs about
   ½ Σ F (W_k − W)² of loss, scaled from the sample to the whole tensor: a loss, so comparable
   across tensors (tied weights collect the gradient of every use).
2. Cost: bits of each option — 1 + k raw bits, the exponent's measured entropy at that k, the
   7-bit scale per block and the index; lossless is an option too.
3. Allocation: every tensor starts at its cheapest option; the upgrade that removes the most loss
   per bit added, and still fits under target_bits × weights, is taken until none fits.
   ``dispatch`` then measures the real size and, if the estimate was short, allocates again
   under a target lowered by the difference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .kernels import planes
from .modules import kind_of

log = logging.getLogger(__name__)

INDEX_BITS = 0.03  # rANS states, tables, offsets and header, per weight (measured ~0.024)
SAMPLE = 1 << 18  # weights per tensor that the sensitivity looks at (whole rows or columns)


def _exp_entropy(sym: torch.Tensor) -> float:
    h = torch.bincount(sym.reshape(-1).to(torch.int64), minlength=256).double()
    p = h[h > 0] / sym.numel()
    return float(-(p * p.log2()).sum())


def check_calibration(calibration: object) -> list[torch.Tensor] | None:
    """``calibration=`` as a list of token-id tensors, or a clear refusal of anything else."""
    if calibration is None:
        return None
    items = [calibration] if isinstance(calibration, torch.Tensor) else calibration
    if not isinstance(items, (list, tuple)) or not items:
        raise TypeError(
            "calibration must be token ids: an integer tensor [batch, seq] or a non-empty list "
            f"of them, got {type(calibration).__name__}"
        )
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(
                f"calibration[{i}] must be an integer tensor of token ids [batch, seq] (as a "
                f"tokenizer's input_ids), got {what}"
            )
        if t.dim() not in (1, 2):
            raise TypeError(
                f"calibration[{i}] must be token ids of shape [batch, seq] or [seq], got "
                f"shape {tuple(t.shape)}"
            )
    return [t if t.dim() == 2 else t.unsqueeze(0) for t in items]


def _vocab_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    raise ValueError("pass calibration inputs: the model has no embedding to draw tokens for")


def _sample_index(w: torch.Tensor, out_dim: int) -> torch.Tensor | None:
    stride = max(1, (w.numel() + SAMPLE - 1) // SAMPLE)
    return None if stride == 1 else torch.arange(0, w.shape[out_dim], stride, device=w.device)


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    try:
        out = model(ids, labels=ids)
        loss = getattr(out, "loss", None)
        if loss is not None:
            return loss
    except TypeError:
        out = model(ids)
    logits = getattr(out, "logits", out)
    return logits.float().square().mean()  # no language-model loss: output energy instead


class MixedPrecision:
    """Options (bits, expected loss) per weight, then allocations for any target."""

    def __init__(
        self,
        model: nn.Module,
        weights: list[tuple[str, torch.Tensor]],
        block_size: int = 512,
        calibration: Sequence[torch.Tensor] | None = None,
        progress: bool = False,
    ):
        self.block_size = block_size
        users: dict[int, list[nn.Module]] = {}
        for m in model.modules():
            w = getattr(m, "weight", None)
            if kind_of(m) is not None and isinstance(w, torch.Tensor):
                users.setdefault(id(w), []).append(m)
        # fused expert tensors [experts, rows, cols]: sampled by rows, chosen per expert
        dims = {
            key: 1
            if p.dim() == 3 or any(kind_of(m).split_dim == 1 for m in users.get(id(p), []))
            else 0
            for key, p in weights
        }
        index = {
            key: _sample_index(p[0], 0) if p.dim() == 3 else _sample_index(p, dims[key])
            for key, p in weights
        }
        fisher = self._fisher(model, weights, dims, index, calibration)
        units = []  # (key the choice is for, its values, their sample's Fisher, sampled values)
        for key, p in weights:
            w = p.detach()
            if index[key] is not None:
                w = w.index_select(dims[key], index[key])
            if p.dim() == 3:
                units += [(f"{key}[{e}]", p[e], fisher[key][e], w[e]) for e in range(p.shape[0])]
            else:
                units.append((key, p, fisher[key], w))
        self.sizes = {key: p.numel() for key, p, _, _ in units}
        self.options: dict[str, list[tuple[float, float, int | None]]] = {}
        for key, p, f, w in tqdm(units, desc="sensitivity", disable=not progress):
            w = w.contiguous()
            scale = p.numel() / w.numel()
            opts = []
            for k in range(8):
                sym, field, scales = planes.lossy_split(w, k, block_size, True)
                wk = planes.lossy_merge(sym, field, scales, k, block_size, w.dtype).view(w.shape)
                loss = 0.5 * scale * float((f * (wk.float() - w.float()).square()).sum())
                bits = 1 + k + _exp_entropy(sym) + planes.SCALE_BITS / block_size + INDEX_BITS
                opts.append((bits, loss, k))
            sym, _ = planes.split(w)
            raw_bits = 8 * planes.lossless_layout(w.dtype).raw_nbytes(w.numel()) / w.numel()
            opts.append((raw_bits + _exp_entropy(sym) + INDEX_BITS, 0.0, None))
            self.options[key] = sorted(opts, key=lambda o: o[0])

    @staticmethod
    def _fisher(model, weights, dims, index, calibration) -> dict[str, torch.Tensor]:
        """Mean squared gradient of the loss, on each weight's sample (fp32, host)."""
        if calibration is None:
            g = torch.Generator().manual_seed(0)
            calibration = list(torch.randint(0, _vocab_size(model), (4, 1, 128), generator=g))
        params = dict(weights)
        flags = {key: p.requires_grad for key, p in weights}
        acc = {key: 0.0 for key in params}
        was_training = model.training
        model.eval()
        try:
            for p in params.values():
                p.requires_grad_(True)
            for ids in calibration:
                ids = ids if ids.dim() == 2 else ids[None]
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    _loss(model, ids).backward()
                for key, p in params.items():
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    if index[key] is not None:
                        grad = grad.index_select(dims[key], index[key])
                    acc[key] = acc[key] + grad.float().square().cpu()
        finally:
            model.zero_grad(set_to_none=True)
            for key, p in params.items():
                p.requires_grad_(flags[key])
            model.train(was_training)
        return {key: a / len(calibration) for key, a in acc.items()}

    def allocate(self, target_bits: float) -> dict[str, int | None]:
        """k per weight, or per expert of a fused expert tensor (``key[e]``: its piece's key)
        (None: lossless), with estimated bits ≤ target_bits per weight."""
        sizes = self.sizes
        total_w = sum(sizes.values())
        budget = target_bits * total_w
        # The quadratic estimate understates large errors: never go more than one bit below
        # the widest k that would fit uniformly.
        uniform = [
            k
            for k in range(8)
            if sum(
                next(o[0] for o in opts if o[2] == k) * sizes[key]
                for key, opts in self.options.items()
            )
            <= budget
        ]
        floor = max(uniform) - 1 if uniform else 0
        options = {
            key: [o for o in opts if o[2] is None or o[2] >= floor]
            for key, opts in self.options.items()
        }
        choice = {k: 0 for k in options}
        used = sum(options[k][0][0] * sizes[k] for k in options)
        if used > budget:
            log.info(  # dispatch warns with the measured size (encode.compress_to_target)
                "target_bits=%.3f is below the cheapest choice (%.3f bits); using it",
                target_bits,
                used / total_w,
            )
        while True:
            best = None
            for key, opts in options.items():
                cur_bits, cur_loss, _ = opts[choice[key]]
                for j in range(choice[key] + 1, len(opts)):
                    bits, loss, _ = opts[j]
                    extra = (bits - cur_bits) * sizes[key]
                    gain = cur_loss - loss
                    if gain <= 0 or used + extra > budget:
                        continue
                    ratio = gain / max(extra, 1e-9)
                    if best is None or ratio > best[0]:
                        best = (ratio, key, j, extra)
            if best is None:
                break
            _, key, j, extra = best
            choice[key] = j
            used += extra
        log.info(
            "mixed precision: %.3f bits/weight estimated for target %.3f",
            used / total_w,
            target_bits,
        )
        return {key: options[key][j][2] for key, j in choice.items()}
