"""A Hugging Face safetensors checkpoint opened for reading, one tensor (or expert) at a time.

Format layer: the uncompressed input of the data path. conversion.py reads its shards through
it (an expert's piece may gather tensors from several shards), and dispatch(checkpoint=)
(encode.compress_from_files) streams a model's weights from it. Shards are memory-mapped by
safetensors when first read and stay open until :meth:`SourceFiles.close`; a piece of a fused
expert tensor is read as one row of it, a per-expert piece as its few tensors concatenated
(expert_layout.py), so no more than one expert's tensors is ever in memory for it.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import CheckpointError
from .expert_layout import ExpertPiece, ExpertTensors, Source, find_experts, merge
from .storage import read_safetensors_header


def source_shards(src: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (sharded or single)."""
    if src.is_file():
        return [src]
    index = src / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [src / f for f in sorted(set(weight_map.values()))]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no safetensors weights found (model*.safetensors)")
    return files


class SourceFiles:
    """Tensors of safetensors files by name: ``files`` maps each name to its file."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    @classmethod
    def of_dir(cls, src: Path) -> tuple[SourceFiles, ExpertTensors]:
        """A checkpoint directory (or file) opened, and the experts its tensors hold."""
        files: dict[str, Path] = {}
        shapes: dict[str, list[int]] = {}
        for shard in source_shards(src):
            header, _ = read_safetensors_header(shard)
            for name, info in header.items():
                if name != "__metadata__":
                    files[name] = shard
                    shapes[name] = info["shape"]
        return cls(files), find_experts(shapes)

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read whole."""
        return self._handle(name).get_tensor(name)

    def read(self, source: Source) -> torch.Tensor:
        """A source tensor: whole, or its one row ``source.row`` (dim 0 dropped)."""
        if source.row is None:
            return self.get(source.name)
        return self._handle(source.name).get_slice(source.name)[source.row]

    def piece(self, piece: ExpertPiece) -> torch.Tensor:
        """One expert's piece of a fused parameter ([2I, H] or [H, I]), read and merged."""
        return merge([self.read(s) for s in piece.sources])

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
