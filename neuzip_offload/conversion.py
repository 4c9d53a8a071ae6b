"""convert(): a Hugging Face safetensors checkpoint → a compressed checkpoint, streaming.

The writing side of checkpoint.py's format. Each input shard is read (memory-mapped) by one
process at a time and becomes one output shard: its float matrices are compressed (in row pieces
cut by pieces.cut, the rule dispatch uses), everything else is stored plain with a CRC-32. Each
output shard is published atomically (storage.atomic_write) and recorded in a progress file, so
an interrupted conversion resumes where it stopped; the input is only read. Worker processes
(workers.WorkerProcesses, fresh interpreters, never forks) convert shards side by side, or
split a lone shard's tensors, with this process gathering and writing its output.
:func:`compress_tensors` is also what save_compressed() stores unsaved weights with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import dtypes
from . import pieces as piece_rule
from .checkpoint import (
    DEFAULT_PIECE_BYTES,
    INDEX_NAME,
    PROGRESS_NAME,
    CheckpointError,
    Entry,
    index_settings,
    write_index,
)
from .codec import compress_many
from .config import CodecConfig
from .storage import read_safetensors_header, write_json, write_safetensors
from .workers import Job, WorkerProcesses, shared_pool, usable_cpus

log = logging.getLogger(__name__)

# What a source directory holds besides its weights is carried over as it is (config, generation
# config, tokenizer files, chat_template.jinja, a sentence-transformers pooling folder ...);
# weight files, in any format, and hidden files are not.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")


def is_weight_file(name: str) -> bool:
    """Whether a file of a model directory holds (or indexes) weights."""
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEXES)


def copy_companions(src_dir: Path, dst: Path) -> list[str]:
    """Copy every file of ``src_dir`` that is not a weight file, a hidden file or this format's
    own, subfolders included; returns the names copied (relative paths)."""
    copied = []
    own = {INDEX_NAME, PROGRESS_NAME}
    out = dst.resolve()
    for path in sorted(src_dir.rglob("*")):
        rel = path.relative_to(src_dir)
        if (
            not path.is_file()
            or path.resolve().is_relative_to(out)  # the output inside the source
            or any(part.startswith(".") for part in rel.parts)
            or is_weight_file(path.name)
            or str(rel) in own
        ):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst / rel)
        copied.append(str(rel))
    return copied


def _nbytes(info: dict) -> int:
    """Bytes of a tensor a safetensors header describes (4 per element for an unknown dtype)."""
    try:
        itemsize = dtypes.of_safetensors(info["dtype"]).itemsize
    except KeyError:
        itemsize = 4
    return math.prod(info["shape"]) * itemsize


def _row_pieces(
    shape: tuple[int, ...], itemsize: int, max_piece_bytes: int
) -> list[tuple[int, int]]:
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    return piece_rule.cut(shape[0], math.prod(shape) * itemsize, max_piece_bytes)


_FLOATS = {d.safetensors: d.itemsize for d in dtypes.COMPRESSIBLE}  # "BF16" → 2
_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.12.mlp.up_proj.weight" → "model.layers.12"


def layer_bytes(headers: list[dict], dtype: torch.dtype | None) -> int:
    """The largest layer's compressible bytes, as dispatch measures its blocks (0: no layers).

    Dispatch's limit is the largest layer's weights: the 2-D float matrices of its Linear,
    Embedding and Conv1D modules, in the dtype they have then. Without the modules, a layer is
    the tensors named "<prefix>.<number>." and its weights are its 2-D bf16/fp16/fp32 tensors,
    counted in ``dtype`` when the conversion casts them; norms, biases and buffers do not count.
    """
    layers: dict[str, int] = {}
    for h in headers:
        for name, v in h.items():
            m = _LAYER.match(name) if name != "__metadata__" else None
            if m is None or len(v["shape"]) != 2 or v["dtype"] not in _FLOATS:
                continue
            itemsize = dtypes.of(dtype).itemsize if dtype is not None else _FLOATS[v["dtype"]]
            layers[m.group(1)] = layers.get(m.group(1), 0) + math.prod(v["shape"]) * itemsize
    return max(layers.values(), default=0)


def _compressible(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16, torch.float32) and t.dim() >= 2


@dataclass
class ShardResult:
    """What one output shard holds: its tensors (planes and plain ones), the compressed
    tensors' headers (the shard's metadata), and the index entries of its input tensors."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    entries: dict[str, Entry]


def compress_tensors(
    items: Iterator[tuple[str, torch.Tensor]],
    shard_name: str,
    cfg: CodecConfig,
    dtype: torch.dtype | None,
    max_piece_bytes: int,
    pool: Executor | None,
    bar: tqdm,
    batch_weights: int = 1 << 25,
) -> ShardResult:
    """Compress (or keep) every tensor of one input shard, in batches for the rANS encoder.

    Float matrices (converted to ``dtype`` first unless None) are compressed, in row pieces
    "<name>[i]" when larger than ``max_piece_bytes``; the rest are kept plain with a CRC-32.
    ``shard_name`` is the output shard the entries point to; ``bar`` counts weights done.
    """
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    entries: dict[str, Entry] = {}
    batch: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        cts = compress_many([t for _, t in batch], cfg, names=[n for n, _ in batch], pool=pool)
        for (piece, t), ct in zip(batch, cts, strict=True):
            header, planes = ct.state()
            metadata[piece] = header
            for k, p in planes.items():
                tensors[f"{piece}::{k}"] = p.contiguous()
            bar.update(t.numel())
        batch.clear()

    for name, t in items:
        if _compressible(t):
            t = t if dtype is None else t.to(dtype)
            pieces = _row_pieces(tuple(t.shape), t.element_size(), max_piece_bytes)
            names = [name] if len(pieces) == 1 else [f"{name}[{i}]" for i in range(len(pieces))]
            located = [(pn, shard_name, a, b) for pn, (a, b) in zip(names, pieces, strict=True)]
            entries[name] = Entry(
                name, "compressed", tuple(t.shape), dtypes.of(t.dtype).name, pieces=located
            )
            for pn, (a, b) in zip(names, pieces, strict=True):
                batch.append((pn, t[a:b] if len(pieces) > 1 else t))
                if sum(x.numel() for _, x in batch) >= batch_weights:
                    flush()
        else:
            data = t.contiguous()
            tensors[name] = data
            crc = zlib.crc32(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else 0
            entries[name] = Entry(
                name, "plain", tuple(t.shape), dtypes.of(t.dtype).name, shard_name, crc
            )
            bar.update(t.numel())
    flush()
    return ShardResult(tensors, metadata, entries)


def _encode_group(
    shard: Path,
    names: list[str],
    out_name: str,
    cfg: CodecConfig,
    dtype: torch.dtype | None,
    max_piece_bytes: int,
) -> tuple[dict, dict, dict]:
    """In a worker process: compress some tensors of a shard (read from its own memory map);
    results as (bytes as a numpy array, dtype name, shape), plain to pickle."""
    with safe_open(str(shard), framework="pt") as f:
        r = compress_tensors(
            ((n, f.get_tensor(n)) for n in names),
            out_name,
            cfg,
            dtype,
            max_piece_bytes,
            None,
            tqdm(disable=True),
        )
    arrays = {
        k: (
            t.reshape(-1).contiguous().view(torch.uint8).numpy(),
            dtypes.of(t.dtype).name,
            tuple(t.shape),
        )
        for k, t in r.tensors.items()
    }
    return arrays, r.metadata, {k: e.to_json() for k, e in r.entries.items()}


def convert_shard(
    shard: Path,
    out: Path,
    cfg: CodecConfig,
    dtype: torch.dtype | None,
    max_piece_bytes: int,
    procs: WorkerProcesses | None = None,
) -> dict:
    """One input shard → one output shard on disk (published atomically); returns the index
    entries of its tensors as JSON.

    Without ``procs``, in the calling process (this one, or a worker converting shards side by
    side); with ``procs``, the shard's tensors are divided among its processes by size and
    this process gathers and writes them (the same bytes either way).
    """
    if procs is None:
        with safe_open(str(shard), framework="pt") as f:
            result = compress_tensors(
                ((n, f.get_tensor(n)) for n in f.keys()),  # noqa: SIM118
                out.name,
                cfg,
                dtype,
                max_piece_bytes,
                shared_pool(),
                tqdm(disable=True),
            )
    else:
        result = _gather(shard, out.name, cfg, dtype, max_piece_bytes, procs)
    write_safetensors(result.tensors, result.metadata, out)
    return {k: e.to_json() for k, e in result.entries.items()}


def _gather(
    shard: Path,
    out_name: str,
    cfg: CodecConfig,
    dtype: torch.dtype | None,
    max_piece_bytes: int,
    procs: WorkerProcesses,
) -> ShardResult:
    """A shard's tensors compressed in groups of about equal bytes, one a process."""
    header, _ = read_safetensors_header(shard)
    sizes = {k: _nbytes(v) for k, v in header.items() if k != "__metadata__"}
    groups: list[list[str]] = [[] for _ in range(min(procs.n, len(sizes)))]
    load = [0] * len(groups)
    for name in sorted(sizes, key=lambda k: -sizes[k]):  # largest first, to the least loaded
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += sizes[name]
    args = (out_name, cfg, dtype, max_piece_bytes)
    jobs = [Job(_encode_group, (shard, g, *args), f"{shard} ({len(g)} tensors)") for g in groups]
    result = ShardResult({}, {}, {})
    for _, (arrays, metadata, entries) in procs.run(jobs):
        for k, (a, dt, shape) in arrays.items():
            result.tensors[k] = torch.from_numpy(a).view(dtypes.of_name(dt).dtype).view(shape)
        result.metadata.update(metadata)
        result.entries.update({k: Entry.from_json(k, v) for k, v in entries.items()})
    return result


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


def _file_id(p: Path) -> dict:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _finish(dst: Path, settings: dict, entries: dict[str, Entry], src_dir: Path) -> Path:
    """Copy the source's other files (config, tokenizer ...), then publish the index (the
    checkpoint is complete from then on)."""
    if src_dir.is_dir():
        copy_companions(src_dir, dst)
    write_index(dst, settings, entries)
    return dst


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    mode: str = "lossless",
    mantissa_bits: int = 3,
    block_size: int = 512,
    codec: str = "ans",
    dtype: str | torch.dtype | None = None,
    max_piece_bytes: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Compress a Hugging Face safetensors checkpoint (sharded or not) into ``dst``.

    Each input shard is read (memory-mapped) by one process at a time and becomes one output
    shard, written to a temporary file and renamed; finished shards are recorded so that a rerun
    after an interruption skips them. The input is only read. ``dtype`` ("bf16", "fp16", "fp32"):
    convert floats first; None keeps each tensor's own dtype (lossless in it).
    ``max_piece_bytes``: larger tensors are stored in row pieces, so that an embedding or head
    streams through slots no larger than a layer (default: the largest layer's weights, as
    dispatch measures them, the layers recognized by the tensor names; 256 MiB if none).
    ``workers``: processes converting, this one included (the rANS encoder is single-threaded
    Python, so processes, not threads): shards are converted side by side, or a lone shard's
    tensors are split between them. The others are fresh interpreters (workers.py), ready after
    a few seconds; this process converts meanwhile. Default: one per usable CPU when there is
    over 64 MB to convert. A shard that fails raises WorkerError naming it.
    Peak memory is about ``workers`` x (largest shard + its compressed output + ~0.5 GB of
    encoder scratch).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"src={str(src)!r} does not exist")
    if dst.resolve() == (src if src.is_dir() else src.parent).resolve():
        raise CheckpointError(
            "dst must differ from the source directory (the input is never modified)"
        )
    if isinstance(dtype, str):
        if dtype not in dtypes.SHORT_NAMES:
            raise ValueError(
                f"dtype must be one of {sorted(dtypes.SHORT_NAMES)} or None, got {dtype!r}"
            )
        dtype = dtypes.of_short(dtype).dtype
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    cfg = CodecConfig(mode=mode, codec=codec, mantissa_bits=mantissa_bits, block_size=block_size)
    shards = source_shards(src)
    headers = [read_safetensors_header(s)[0] for s in shards]
    if max_piece_bytes is None:
        max_piece_bytes = layer_bytes(headers, dtype) or DEFAULT_PIECE_BYTES
    dst.mkdir(parents=True, exist_ok=True)
    settings = index_settings(cfg, dtype, max_piece_bytes)
    progress_path = dst / PROGRESS_NAME
    state = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    if state.get("settings") != settings:
        state = {"settings": settings, "done": {}}
    weights, nbytes = {}, {}
    for s, h in zip(shards, headers, strict=True):
        items = [v for k, v in h.items() if k != "__metadata__"]
        weights[s] = sum(math.prod(v["shape"]) for v in items)
        nbytes[s] = sum(_nbytes(v) for v in items)
    if workers is None:
        workers = usable_cpus() if sum(nbytes.values()) > 64 * 2**20 else 1
    bar = tqdm(
        total=sum(weights.values()),
        desc="compressing",
        unit="w",
        unit_scale=True,
        disable=not progress,
    )
    width = len(str(len(shards)))
    out_names = {
        s: f"neuzip-{i + 1:0{width}d}-of-{len(shards):0{width}d}.safetensors"
        for i, s in enumerate(shards)
    }
    entries: dict[str, Entry] = {}
    todo = []
    for shard in shards:
        done = state["done"].get(shard.name)
        out = dst / out_names[shard]
        if (
            done
            and done["source"] == _file_id(shard)
            and out.exists()
            and (_file_id(out)["size"] == done["size"])
        ):
            entries.update({k: Entry.from_json(k, v) for k, v in done["entries"].items()})
            bar.update(done["weights"])
            log.info("%s: already converted, skipped", shard.name)
        else:
            todo.append(shard)

    def record(shard: Path, shard_entries: dict) -> None:
        entries.update({k: Entry.from_json(k, v) for k, v in shard_entries.items()})
        state["done"][shard.name] = {
            "source": _file_id(shard),
            "size": _file_id(dst / out_names[shard])["size"],
            "weights": weights[shard],
            "entries": shard_entries,
        }
        write_json(progress_path, state)
        bar.update(weights[shard])

    args = (cfg, dtype, max_piece_bytes)
    with WorkerProcesses(workers) as procs:
        if len(todo) == 1 and workers > 1:  # a lone shard: its tensors divided among them
            record(todo[0], convert_shard(todo[0], dst / out_names[todo[0]], *args, procs))
        else:  # whole shards, side by side
            jobs = [Job(convert_shard, (s, dst / out_names[s], *args), str(s)) for s in todo]
            for i, shard_entries in procs.run(jobs):
                record(todo[i], shard_entries)
    bar.close()
    return _finish(dst, settings, entries, src if src.is_dir() else src.parent)
