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
)

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
