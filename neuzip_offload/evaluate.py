"""Measures for judging a dispatched model: perplexity (mean next-token NLL over fixed windows of
text) and the time of each greedy decode step."""

from __future__ import annotations

import inspect
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

_REPO = Path(__file__).resolve().parents[1]
TEXT_CANDIDATES = (
    _REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
    _REPO / "tests" / "data" / "tinyshakespeare_head.txt",  # a 40 kB excerpt, in the repo
)


def text_path() -> Path:
    """tinyshakespeare: $NEUZIP_TEXT, else ../shared/data/, else the repo's excerpt."""
    env = os.environ.get("NEUZIP_TEXT")
    for p in ([Path(env)] if env else []) + list(TEXT_CANDIDATES):
        if p.exists():
            return p
    raise FileNotFoundError("no text for perplexity: set NEUZIP_TEXT to a text file")


def token_ids(tokenizer, n_tokens: int, path: Path | None = None) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the text, as a 1-D tensor."""
    text = (path or text_path()).read_text(encoding="utf-8")
    chars = max(4 * n_tokens, 2000)
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt").input_ids[0]
        if ids.numel() >= n_tokens or chars >= len(text):
            return ids[:n_tokens]
        chars *= 2


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512) -> float:
    """exp(mean NLL) of each token given the previous ones within non-overlapping windows."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1]
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).logits.float()
        nll = nn.functional.cross_entropy(logits[0], chunk[1:].to(logits.device), reduction="sum")
        total += float(nll)
        count += chunk.numel() - 1
    return math.exp(total / count)


def cache_keyword(model: nn.Module) -> str:
    """transformers 5 calls the KV cache argument ``cache``; earlier versions past_key_values."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def decode_step_seconds(model: nn.Module, prompt: torch.Tensor, tokens: int) -> list[float]:
    """Wall seconds of each of ``tokens`` greedy decode steps (KV cache) after ``prompt``."""
    from transformers import DynamicCache

    key = cache_keyword(model)
    cache = DynamicCache()
    out = model(prompt, use_cache=True, **{key: cache})
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        t = time.perf_counter()
        out = model(nxt, use_cache=True, **{key: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t)
    return times
