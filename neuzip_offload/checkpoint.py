"""Compressed checkpoints: the directory format, its index, and the reader.

A checkpoint directory::

    neuzip.index.json                      format, version, settings, and every tensor's entry
    neuzip-00001-of-00004.safetensors      planes as uint8 tensors "<name>::exp", "::meta", ...
    config.json, tokenizer files ...       copied from the source, so the model can be rebuilt

Each compressed tensor (or row piece "<name>[i]" of a large one) has its header in the shard's
safetensors metadata; tensors left as they are (norms, biases, integer buffers) are stored
plain, with a CRC-32 in the index. Any safetensors reader opens the shards.

Part of the format layer: :class:`Checkpoint` names where each plane sits on disk (the
scheduler's disk tier reads it from there) and reads and checks tensors; conversion.py writes
checkpoints from Hugging Face files, save_compressed() from a model. Both publish the index last,
with :func:`write_index`.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import dtypes
from .compressed import PLANE_NAMES, CompressedTensor, DamagedDataError, Header
from .config import CodecConfig
from .storage import (
    PlaneLocation,
    pread_into,
    read_safetensors_header,
    write_json,
    write_safetensors,
)
from .workers import shared_pool

INDEX_NAME = "neuzip.index.json"
PROGRESS_NAME = ".neuzip-progress.json"
FORMAT_NAME = "neuzip-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_PIECE_BYTES = 256 * 2**20  # row pieces when no layers are recognized (conversion.py)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or written as asked (not damage)."""


# ---------------------------------------------------------------------------------------------
# reading a checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One tensor of the checkpoint: stored plain, or compressed in one or more row pieces."""

    name: str
    kind: str  # "compressed" | "plain"
    shape: tuple[int, ...]
    dtype: str
    shard: str = ""  # plain: its shard
    crc: int = 0  # plain: CRC-32 of its bytes
    pieces: list[tuple[str, str, int, int]] | None = None  # (piece name, shard, start, stop)

    def to_json(self) -> dict:
        d = {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.kind == "plain":
            d.update(shard=self.shard, crc=self.crc)
        else:
            d["pieces"] = [list(p) for p in self.pieces]
        return d

    @classmethod
    def from_json(cls, name: str, d: dict) -> Entry:
        pieces = [tuple(p) for p in d["pieces"]] if "pieces" in d else None
        return cls(
            name,
            d["kind"],
            tuple(d["shape"]),
            d["dtype"],
            d.get("shard", ""),
            int(d.get("crc", 0)),
            pieces,
        )


class Checkpoint:
    """A compressed checkpoint directory, opened for reading (no planes are read until asked)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if not index.exists():
            raise CheckpointError(f"{self.path} is not a neuzip checkpoint ({INDEX_NAME} missing)")
        try:
            d = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise DamagedDataError(f"{index}: damaged index ({e})") from e
        if d.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{index}: not a {FORMAT_NAME} index")
        if d.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{index}: checkpoint version {d.get('version')} is not supported (this reader "
                f"knows version {CHECKPOINT_VERSION}); upgrade neuzip-offload"
            )
        self.settings: dict = d.get("settings", {})
        self.entries = {k: Entry.from_json(k, v) for k, v in d["tensors"].items()}
        self.aliases: dict[str, str] = d.get("aliases", {})
        self._headers: dict[str, tuple[dict, int]] = {}

    def shard_header(self, shard: str) -> tuple[dict, int]:
        if shard not in self._headers:
            p = self.path / shard
            if not p.exists():
                raise DamagedDataError(f"{p}: shard is missing")
            self._headers[shard] = read_safetensors_header(p)
        return self._headers[shard]

    def header(self, piece: str, shard: str) -> Header:
        h, _ = self.shard_header(shard)
        text = h.get("__metadata__", {}).get(piece)
        if text is None:
            raise DamagedDataError(f"{shard}: no header for tensor {piece!r}")
        return Header.from_json(text, f"{piece} ({shard})")

    def locations(self, piece: str, shard: str) -> dict[str, PlaneLocation]:
        h, start = self.shard_header(shard)
        out = {}
        for plane in PLANE_NAMES:
            info = h.get(f"{piece}::{plane}")
            if info is not None:
                a, b = info["data_offsets"]
                out[plane] = PlaneLocation(self.path / shard, start + a, b - a)
        return out

    def read_compressed(self, piece: str, shard: str, alloc=None) -> CompressedTensor:
        """One piece with its planes read from disk (checked: sizes, checksum, index)."""
        header = self.header(piece, shard)
        locs = self.locations(piece, shard)
        planes = {}
        for k, loc in locs.items():
            buf = alloc(loc.nbytes) if alloc else torch.empty(loc.nbytes, dtype=torch.uint8)
            pread_into(loc, buf)
            planes[k] = buf
        return CompressedTensor.from_state(header.to_json(), planes, f"{piece} ({shard})")

    def read_plain(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        h, start = self.shard_header(e.shard)
        info = h.get(name)
        if info is None:
            raise DamagedDataError(f"{e.shard}: tensor {name!r} is missing")
        a, b = info["data_offsets"]
        buf = torch.empty(b - a, dtype=torch.uint8)
        pread_into(PlaneLocation(self.path / e.shard, start + a, b - a), buf)
        if zlib.crc32(buf.numpy()) != e.crc:
            raise DamagedDataError(f"{name} ({e.shard}): fails its checksum")
        dtype = dtypes.of_safetensors(info["dtype"]).dtype
        return buf.view(dtype).view(tuple(info["shape"]))

    def verify(self, progress: bool = False) -> None:
        """Read every tensor once and check it (raises DamagedDataError naming file and tensor)."""
        names = list(self.entries)
        for name in tqdm(names, desc="verifying", disable=not progress):
            e = self.entries[name]
            if e.kind == "plain":
                self.read_plain(name)
            else:
                for piece, shard, _, _ in e.pieces:
                    self.read_compressed(piece, shard)

    def compressed_bytes(self) -> int:
        total = 0
        for e in self.entries.values():
            if e.kind == "compressed":
                for piece, shard, _, _ in e.pieces:
                    total += sum(loc.nbytes for loc in self.locations(piece, shard).values())
                    total += len(self.header(piece, shard).to_json())
        return total


# ---------------------------------------------------------------------------------------------
# the index, written last
# ---------------------------------------------------------------------------------------------


def index_settings(cfg: CodecConfig, dtype: torch.dtype | None, max_piece_bytes: int) -> dict:
    """The index's "settings": how its tensors were compressed (also a conversion's resume key)."""
    return {
        "mode": cfg.mode,
        "codec": cfg.codec,
        "mantissa_bits": cfg.mantissa_bits,
        "block_size": cfg.block_size,
        "dtype": None if dtype is None else dtypes.of(dtype).name,
        "max_piece_bytes": max_piece_bytes,
    }


def write_index(
    dst: Path,
    settings: dict,
    entries: dict[str, Entry],
    aliases: dict[str, str] | None = None,
) -> None:
    """Publish the index of the checkpoint in ``dst`` (atomically), which completes it: the
    progress file of a conversion into ``dst`` is removed."""
    write_json(
        dst / INDEX_NAME,
        {
            "format": FORMAT_NAME,
            "version": CHECKPOINT_VERSION,
            "settings": settings,
            "tensors": {k: e.to_json() for k, e in sorted(entries.items())},
            "aliases": dict(sorted((aliases or {}).items())),
        },
    )
    progress = dst / PROGRESS_NAME
    if progress.exists():
        progress.unlink()


# ---------------------------------------------------------------------------------------------
# Until save_compressed() below moves to save.py (issue 9, a parallel change), the names it
# calls; they leave with it (save.py calls conversion.compress_tensors, storage.write_safetensors,
# write_index and index_settings directly).
# ---------------------------------------------------------------------------------------------

_settings = index_settings
_atomic_save = write_safetensors


def _finish(dst: Path, settings: dict, entries: dict, src_dir: None, aliases: dict) -> Path:
    write_index(dst, settings, entries, aliases)
    return dst


def _compress_shard(*args, **kwargs):
    from .conversion import compress_tensors  # conversion.py imports this module

    return compress_tensors(*args, **kwargs)


def save_compressed(
    model_or_state_dict,
    out_dir: str | os.PathLike,
    *,
    mode: str = "lossless",
    mantissa_bits: int = 3,
    block_size: int = 512,
    codec: str = "ans",
    max_shard_bytes: int = 2 * 10**9,
    max_piece_bytes: int = DEFAULT_PIECE_BYTES,
    progress: bool = True,
) -> Path:
    """Write a model (dispatched or not) or a state dict as a compressed checkpoint.

    A dispatched model's compressed weights are written as they are (a trained model's current
    weights, in its own pieces); everything else is compressed with the given settings. Tensors
    that share storage (tied weights) are written once; the others become aliases in the index.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = CodecConfig(mode=mode, codec=codec, mantissa_bits=mantissa_bits, block_size=block_size)
    handle = getattr(model_or_state_dict, "neuzip", None)
    if isinstance(model_or_state_dict, torch.nn.Module):
        state = dict(model_or_state_dict.state_dict())
        config = getattr(model_or_state_dict, "config", None)
    elif isinstance(model_or_state_dict, dict):
        state, config = dict(model_or_state_dict), None
    else:
        raise TypeError(
            "model_or_state_dict must be an nn.Module or a dict of tensors, got "
            f"{type(model_or_state_dict).__name__}"
        )
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
    state = {k: v.detach().cpu() for k, v in state.items()}
    ready = {w.key: w for w in handle.weights} if handle is not None else {}
    for w in ready.values():
        for qn, _ in w.users[1:]:
            aliases[f"{qn}.weight" if qn else "weight"] = w.key
    # shards of about max_shard_bytes of decoded data
    names = sorted(set(state) | set(ready))
    weights_of = {n: (ready[n].shape.numel() if n in ready else state[n].numel()) for n in names}
    groups, current, size = [], [], 0
    for n in names:
        nbytes = ready[n].nbytes if n in ready else state[n].numel() * state[n].element_size()
        if current and size + nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes
    if current:
        groups.append(current)
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
                str(w.dtype)[6:],
                pieces=[(k, shard, a, b) for k, a, b in w.pieces],
            )
            bar.update(weights_of[n])
        todo = ((n, state[n]) for n in group if n not in ready)
        result = _compress_shard(todo, shard, cfg, None, max_piece_bytes, pool, bar)
        tensors.update(result.tensors)
        metadata.update(result.metadata)
        entries.update(result.entries)
        _atomic_save(tensors, metadata, out / shard)
    bar.close()
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(out / "config.json"))
    return _finish(out, _settings(cfg, None, max_piece_bytes), entries, None, aliases)
