"""save_compressed(): a model (dispatched or not) or a state dict written as a compressed
checkpoint, which load() runs.

A dispatched model's weights are written as its handle holds them (``Dispatched.export()`` and
``compressed_tensor``: a trained model's current weights, in its own pieces, never compressed
again); every other tensor is compressed like a conversion does (checkpoint format, shards of
about ``max_shard_bytes`` decoded bytes, an index written last).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import dtypes
from .checkpoint import DEFAULT_PIECE_BYTES, Entry, index_settings, write_index
from .config import CodecConfig
from .conversion import compress_tensors, layer_bytes
from .handle import Dispatched, ExportedWeight
from .storage import write_safetensors
from .workers import shared_pool


def save_compressed(
    model_or_state_dict: torch.nn.Module | dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    mode: str | None = None,
    mantissa_bits: int | None = None,
    block_size: int | None = None,
    codec: str | None = None,
    max_shard_bytes: int = 2 * 10**9,
    max_piece_bytes: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a model (dispatched or not) or a state dict as a compressed checkpoint.

    Large tensors outside the layers are cut into row pieces no larger than the largest layer's
    weights, as ``convert`` cuts them (``max_piece_bytes`` to choose), so that what is written
    loads at the budget the model dispatches at. A dispatched model's compressed weights are
    written as they are (a trained model's current weights, in its own pieces), and the index
    records the settings they were coded with: the codec settings may be left out (given, they
    must agree). Otherwise everything is compressed with the given settings (default: lossless,
    ans). Tensors that share storage (tied weights) are written once; the others become aliases
    in the index. A transformers model's config and generation config are written beside.
    """
    out = Path(out_dir)
    handle: Dispatched | None = getattr(model_or_state_dict, "neuzip", None)
    asked = {
        "mode": mode,
        "codec": codec,
        "mantissa_bits": mantissa_bits,
        "block_size": block_size,
    }
    asked = {k: v for k, v in asked.items() if v is not None}
    if handle is not None:
        cfg = handle.config
        differ = {k: v for k, v in asked.items() if v != getattr(cfg, k)}
        if differ:
            held = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in differ)
            raise ValueError(
                f"save_compressed writes a dispatched model's weights as they are coded ({held}), "
                f"not as asked ({', '.join(f'{k}={v!r}' for k, v in differ.items())}): leave "
                "those arguments out, or nzo.undispatch(model) first to compress it anew"
            )
    else:
        cfg = CodecConfig(**{"mode": "lossless", "codec": "ans", **asked})
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model_or_state_dict, torch.nn.Module):
        if handle is not None:  # its compressed weights are read as they are held, below
            with handle.compressed_weights_left_out():
                state = dict(model_or_state_dict.state_dict())
        else:
            state = dict(model_or_state_dict.state_dict())
        config = getattr(model_or_state_dict, "config", None)
    elif isinstance(model_or_state_dict, dict):
        state, config = dict(model_or_state_dict), None
    else:
        raise TypeError(
            "model_or_state_dict must be an nn.Module or a dict of tensors, got "
            f"{type(model_or_state_dict).__name__}"
        )
    state, aliases = _unique(state)
    if max_piece_bytes is None:  # cut as convert() cuts: at the largest layer's weights
        shapes = {
            n: {"shape": list(t.shape), "dtype": dtypes.of(t.dtype).safetensors}
            for n, t in state.items()
        }
        max_piece_bytes = layer_bytes([shapes], None) or DEFAULT_PIECE_BYTES
    ready: dict[str, ExportedWeight] = (
        {w.name: w for w in handle.export()} if handle is not None else {}
    )
    for w in ready.values():
        aliases.update((other, w.name) for other in w.aliases)
    names = sorted(set(state) | set(ready))
    weights_of = {n: (ready[n].shape.numel() if n in ready else state[n].numel()) for n in names}
    nbytes_of = {
        n: ready[n].nbytes if n in ready else state[n].numel() * state[n].element_size()
        for n in names
    }
    groups = _shards(names, nbytes_of, max_shard_bytes)
    bar = tqdm(
        total=sum(weights_of.values()),
        desc="saving",
        unit="w",
        unit_scale=True,
        disable=not progress,
    )
    entries: dict[str, Entry] = {}
    width = len(str(len(groups)))
    pool = shared_pool()
    for i, group in enumerate(groups):
        shard = f"neuzip-{i + 1:0{width}d}-of-{len(groups):0{width}d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {}
        for n in (n for n in group if n in ready):
            w = ready[n]
            for key, _, _ in w.pieces:
                h, planes = handle.compressed_tensor(key).state()
                metadata[key] = h
                tensors.update({f"{key}::{k}": p.contiguous() for k, p in planes.items()})
            entries[n] = Entry(
                n,
                "compressed",
                tuple(w.shape),
                dtypes.of(w.dtype).name,
                pieces=[(k, shard, a, b) for k, a, b in w.pieces],
            )
            bar.update(weights_of[n])
        todo = ((n, state[n]) for n in group if n not in ready)
        result = compress_tensors(todo, shard, cfg, None, max_piece_bytes, pool, bar)
        tensors.update(result.tensors)
        metadata.update(result.metadata)
        entries.update(result.entries)
        write_safetensors(tensors, metadata, out / shard)
    bar.close()
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(out / "config.json"))
    generation = getattr(model_or_state_dict, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(str(out))
    write_index(out, index_settings(cfg, None, max_piece_bytes), entries, aliases)
    return out


def _unique(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors once each, on the host; name → the name it shares storage with)."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for n in sorted(state):
        t = state[n]
        key = (t.data_ptr(), tuple(t.shape), t.dtype, t.device) if t.numel() else None
        if key is not None and key in seen:
            aliases[n] = seen[key]
            del state[n]
        elif key is not None:
            seen[key] = n
    return {k: v.detach().cpu() for k, v in state.items()}, aliases


def _shards(names: list[str], nbytes_of: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of about ``max_shard_bytes`` decoded bytes."""
    groups, current, size = [], [], 0
    for n in names:
        if current and size + nbytes_of[n] > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes_of[n]
    if current:
        groups.append(current)
    return groups
