"""A model's weights from a neuzip checkpoint: placed where the checkpoint holds them.

What load() does between analysis and blocks: each compressed weight's pieces are taken as the
checkpoint stores them (headers read, planes left in their files; the executor reads them
into host memory or from disk as the plan says). The converter cuts pieces by the same rule as
dispatch (pieces.py), so only a weight stored plain, or in pieces its module cannot use (column
pieces), is decoded and compressed again. A fused expert parameter of a mixture-of-experts model
(``<experts>.gate_up_proj`` [E, 2I, H]) is stored in one piece per expert, ``<param>[e]`` of
value ``param[e]``, as dispatch cuts it; those pieces are taken as stored. A layer block is
read whole or held whole. The other tensors (norms, biases, buffers, routers) are read and put
in place of their meta placeholders, found under transformers' names for them (entry_key).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import warnings
from concurrent.futures import Executor as ThreadPool
from pathlib import Path

import torch
from torch import nn

from .checkpoint import INDEX_NAME, Checkpoint, Entry
from .codec import decompress
from .compressed import CompressedTensor
from .encode import compress_weights
from .expert_layout import checkpoint_names, fused_param
from .model_analysis import (
    Weight,
    check_materialized,
    cut_pieces,
    layer_bytes,
    set_tensor,
    weight_names,
)
from .modules import kind_of
from .options import DispatchError, DispatchOptions
from .storage import PlaneLocation

log = logging.getLogger(__name__)


def check_codec(ck: Checkpoint, device: torch.device) -> None:
    """Refuse a host codec on a GPU; warn of the GPU codec on the CPU (slow, but it works)."""
    if device.type == "cuda" and ck.settings.get("codec") == "zstd":
        raise DispatchError(
            f"{ck.path} is coded with zstd, a host codec: on a GPU every block would be decoded "
            "on the host. Convert it for the GPU with `neuzip-offload compress --codec ans`, or "
            "load it with device='cpu'"
        )
    if device.type == "cpu" and ck.settings.get("codec") == "ans":
        warnings.warn(
            f"{ck.path} is coded with ans, the GPU's codec, which the CPU decodes about 10x "
            "slower than zstd; for CPU inference convert it with codec='zstd' "
            "(neuzip-offload compress --codec zstd)",
            stacklevel=4,  # check_codec <- load's body <- load <- the caller
        )


def stored_bits_per_weight(ck: Checkpoint) -> float:
    """Bits per weight of the checkpoint's compressed tensors, as stored (planes and headers)."""
    n = sum(math.prod(e.shape) for e in ck.entries.values() if e.kind == "compressed")
    return 8 * ck.compressed_bytes() / max(n, 1)


def first_dtype(ck: Checkpoint) -> torch.dtype:
    """The dtype of the checkpoint's first compressed tensor (bf16 when it has none)."""
    first = next((e for e in ck.entries.values() if e.kind == "compressed"), None)
    return getattr(torch, first.dtype) if first is not None else torch.bfloat16


def place_weights(
    ck: Checkpoint,
    weights: list[Weight],
    opts: DispatchOptions,
    pool: ThreadPool | None,
    prefix: str = "",
) -> tuple[dict[str, CompressedTensor], dict[str, dict[str, PlaneLocation]]]:
    """(piece key → tensor, piece key → its planes' files) for every compressed weight: headers
    with placeholder planes where the checkpoint's pieces are used as stored, real planes where
    they were compressed again or a layer block must be held whole."""
    compressed: dict[str, CompressedTensor] = {}
    locations: dict[str, dict[str, PlaneLocation]] = {}
    stored: dict[str, tuple[str, str]] = {}  # piece key → (the checkpoint's piece name, shard)
    for w in weights:
        if w.param.device.type != "meta" and _entry_for(ck, w, prefix, required=False) is None:
            # a weight the caller brought (a peft adapter's): compressed from its values
            cut_pieces([w], max(layer_bytes(weights).values(), default=0))
            compressed.update(
                compress_weights([w], opts.codec, {}, pool, False, opts.encode_budget)
            )
            continue
        entry = _entry_for(ck, w, prefix)
        w.dtype = getattr(torch, entry.dtype)
        if fused_param(w.key) is not None:  # experts: the pieces are dispatch's, one an expert
            _place_expert_weight(ck, w, entry, opts, pool, compressed, locations, stored)
            continue
        dims = {kind_of(m).split_dim for _, m in w.users}
        if entry.kind == "compressed" and (len(entry.pieces) == 1 or dims == {0}):
            # the model's names for the pieces (the checkpoint's may differ: aliases, prefixes)
            n = len(entry.pieces)
            keys = [w.key] if n == 1 else [f"{w.key}[{i}]" for i in range(n)]
            w.pieces = [(k, a, b) for k, (_, _, a, b) in zip(keys, entry.pieces, strict=True)]
            for key, (p, shard, _, _) in zip(keys, entry.pieces, strict=True):
                _place_stored(ck, key, p, shard, compressed, locations, stored)
        else:  # stored plain, or in pieces this module cannot use: decode and compress again
            w.param = read_entry(ck, entry)
            cut_pieces([w], max(layer_bytes(weights).values(), default=0))
            compressed.update(
                compress_weights([w], opts.codec, {}, pool, False, opts.encode_budget)
            )
    _unify_blocks(weights, compressed, locations, ck, stored)
    return compressed, locations


def _place_stored(
    ck: Checkpoint,
    key: str,
    piece: str,
    shard: str,
    compressed: dict[str, CompressedTensor],
    locations: dict[str, dict[str, PlaneLocation]],
    stored: dict[str, tuple[str, str]],
) -> None:
    """The model's piece ``key`` is the checkpoint's ``piece`` as stored: its header, with
    placeholder planes on meta, and where its planes are in ``shard``."""
    header = ck.header(piece, shard)
    placeholders = {
        k: torch.empty(n, dtype=torch.uint8, device="meta") for k, n in header.plane_sizes().items()
    }
    compressed[key] = CompressedTensor(header, placeholders, key)
    locations[key] = ck.locations(piece, shard)
    stored[key] = (piece, shard)


def _place_expert_weight(
    ck: Checkpoint,
    w: Weight,
    entry: Entry,
    opts: DispatchOptions,
    pool: ThreadPool | None,
    compressed: dict[str, CompressedTensor],
    locations: dict[str, dict[str, PlaneLocation]],
    stored: dict[str, tuple[str, str]],
) -> None:
    """A fused expert parameter: its pieces (``w.pieces``, one an expert, as dispatch cut them)
    taken as stored when the checkpoint's pieces have the same ranges, else (stored plain, or
    in other pieces: an older conversion) decoded and compressed again."""
    if tuple(entry.shape) != tuple(w.shape):
        raise DispatchError(
            f"{ck.path}: the checkpoint's {entry.name} has shape {list(entry.shape)}, the "
            f"model's {w.key} {list(w.shape)}"
        )
    ranges = [(a, b) for _, a, b in w.pieces]
    if entry.kind == "compressed" and [(a, b) for *_, a, b in entry.pieces] == ranges:
        for (key, _, _), (p, shard, _, _) in zip(w.pieces, entry.pieces, strict=True):
            _place_stored(ck, key, p, shard, compressed, locations, stored)
        return
    w.param = read_entry(ck, entry)
    compressed.update(compress_weights([w], opts.codec, {}, pool, False, opts.encode_budget))
    w.param = None


def fill_model(ck: Checkpoint, model: nn.Module, weights: list[Weight]) -> None:
    """Read every tensor that is not a compressed weight into the meta-built model."""
    names = weight_names(weights)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in names or t.device.type != "meta":
            continue
        key = entry_key(ck, name, getattr(model, "base_model_prefix", ""))
        if key is None:
            raise DispatchError(f"{ck.path}: the checkpoint lacks {name}")
        set_tensor(model, name, read_entry(ck, ck.entries[key]))
    check_materialized(model, weights)


def read_entry(ck: Checkpoint, entry: Entry) -> torch.Tensor:
    """A tensor of the checkpoint, decoded (pieces joined)."""
    if entry.kind == "plain":
        return ck.read_plain(entry.name)
    # read_compressed checked each checksum already
    parts = [
        decompress(ck.read_compressed(p, shard), verify=False) for p, shard, *_ in entry.pieces
    ]
    # an expert's piece is param[e]: one dim fewer than its entry
    parts = [t.unsqueeze(0) if t.dim() < len(entry.shape) else t for t in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def copy_shards(ck: Checkpoint, dst: Path) -> Checkpoint:
    """The checkpoint's shards copied to ``dst`` (a faster disk), reopened there."""
    dst.mkdir(parents=True, exist_ok=True)
    shards = {p[1] for e in ck.entries.values() if e.pieces for p in e.pieces}
    shards |= {e.shard for e in ck.entries.values() if e.shard}
    for f in [INDEX_NAME, *sorted(shards)]:
        if not (dst / f).exists() or (dst / f).stat().st_size != (ck.path / f).stat().st_size:
            shutil.copyfile(ck.path / f, dst / f)
    return Checkpoint(dst)


def with_adapter(model: nn.Module, adapter: str | os.PathLike) -> nn.Module:
    """``model`` (built on meta) wrapped by the peft adapter saved in ``adapter``, its adapter
    weights read (on the host): load() then fills the base from the compressed checkpoint and
    compresses the adapter's weights from their values, as PeftModel.from_pretrained over the
    uncompressed base would run them."""
    try:
        from peft import PeftConfig, get_peft_model
        from peft.utils import load_peft_weights
    except ImportError as e:
        raise DispatchError("adapter= needs the peft package (pip install peft)") from e
    path = Path(adapter)
    if not path.is_dir():
        raise DispatchError(f"adapter={str(adapter)!r}: no such directory (a peft save_pretrained)")
    wrapped = get_peft_model(model, PeftConfig.from_pretrained(str(path)))
    # peft saves names without the adapter's own ("...lora_A.weight" for "...lora_A.default.weight")
    name = wrapped.active_adapter
    ours = {n.replace(f".{name}.", "."): n for n, _ in wrapped.named_parameters()}
    for key, value in load_peft_weights(str(path)).items():
        if key not in ours:
            raise DispatchError(f"adapter={str(adapter)!r}: {key} has no place in the model")
        set_tensor(wrapped, ours[key], value)
    return wrapped.eval()


def peft_base_name(name: str) -> str:
    """The base model's name of a tensor in a peft-wrapped model ("base_model.model." before it,
    ".base_layer" where LoRA wraps a Linear): a compressed base fills the wrapped model."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer.", ".")


def entry_key(ck: Checkpoint, name: str, prefix: str = "") -> str | None:
    """The checkpoint's name for the model's tensor ``name`` (None: it has none). As
    transformers loads them: the name itself or an alias of it, else the name with the model's
    ``base_model_prefix`` ("transformer", "model", "bert" ...) dropped or added, so that a base
    model's checkpoint fills a model with a head (GPT-2's "h.0..." for "transformer.h.0...")
    and the other way round."""
    for n in checkpoint_names(peft_base_name(name), prefix):
        key = n if n in ck.entries else ck.aliases.get(n)
        if key is not None:
            return key
    return None


def _entry_for(ck: Checkpoint, w: Weight, prefix: str = "", required: bool = True) -> Entry | None:
    for name in dict.fromkeys([w.key, *w.names]):  # (a fused expert parameter: its key)
        key = entry_key(ck, name, prefix)
        if key is not None:
            return ck.entries[key]
    if not required:
        return None
    raise DispatchError(f"{ck.path}: the checkpoint lacks {w.key}")


def _unify_blocks(
    weights: list[Weight],
    compressed: dict[str, CompressedTensor],
    locations: dict[str, dict[str, PlaneLocation]],
    ck: Checkpoint,
    stored: dict[str, tuple[str, str]],
) -> None:
    """A layer block is read from disk whole or held in memory whole: read stragglers now."""
    for root in {w.root for w in weights if w.root is not None}:
        keys = [k for w in weights if w.root == root for k, _, _ in w.pieces]
        on_disk = [k for k in keys if k in locations]
        if on_disk and len(on_disk) != len(keys):
            for k in on_disk:
                locations.pop(k)
                compressed[k] = ck.read_compressed(*stored[k])
