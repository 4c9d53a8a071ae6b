"""convert(): a Hugging Face safetensors checkpoint → a compressed checkpoint, streaming.

The writing side of checkpoint.py's format. Each input shard is read (memory-mapped) by one
process at a time and becomes one output shard: its float matrices are compressed (in row pieces
cut by pieces.cut, the rule dispatch uses), everything else is stored plain with a CRC-32. Each
output shard is published atomically (storage.atomic_write) and recorded in a progress file, so
an interrupted conversion resumes where it stopped; the input is only read. Worker processes
(workers.WorkerProcesses, fresh interpreters, never forks) convert shards side by side, or
split a lone shard's tensors, with this process gathering and writing its output.
Mixture-of-experts tensors, in the Hub's per-expert layout or the fused one (expert_layout.py),
become the fused parameters' pieces, one per expert ("<experts>.gate_up_proj[e]" = param[e]);
each piece is written by the shard of its first source tensor, read one expert at a time
(source.py) even when its gate and up projections are in different files.
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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
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
from .expert_layout import ExpertPiece, find_experts, fused_param, piece_key
from .source import SourceFiles, source_shards
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


def _itemsize(info: dict) -> int:
    """Bytes per element of a tensor a safetensors header describes (4 for an unknown dtype)."""
    try:
        return dtypes.of_safetensors(info["dtype"]).itemsize
    except KeyError:
        return 4


def _nbytes(info: dict) -> int:
    """Bytes of a tensor a safetensors header describes."""
    return math.prod(info["shape"]) * _itemsize(info)


def _row_pieces(
    shape: tuple[int, ...], itemsize: int, max_piece_bytes: int
) -> list[tuple[int, int]]:
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    return piece_rule.cut(shape[0], math.prod(shape) * itemsize, max_piece_bytes)


_FLOATS = {d.safetensors: d.itemsize for d in dtypes.COMPRESSIBLE}  # "BF16" → 2
_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.12.mlp.up_proj.weight" → "model.layers.12"


def layer_bytes(headers: list[dict], dtype: torch.dtype | None) -> int:
    """The largest block's compressible bytes, as dispatch measures its blocks (0: no layers).

    Dispatch's limit is the largest block's weights: a layer's 2-D float matrices of its
    Linear, Embedding and Conv1D modules, in the dtype they have then, or one expert's pieces
    of its layer's fused expert parameters (experts are blocks of their own). Without the
    modules, a layer is the tensors named "<prefix>.<number>." and its weights are its 2-D
    bf16/fp16/fp32 tensors, counted in ``dtype`` when the conversion casts them; norms, biases
    and buffers do not count; expert tensors, in either layout (expert_layout.py), count in
    their expert's block, not in the layer.
    """
    infos = {k: v for h in headers for k, v in h.items() if k != "__metadata__"}
    experts = find_experts({k: v["shape"] for k, v in infos.items()})
    layers: dict[str, int] = {}
    itemsizes: dict[str, int] = {}
    for name, v in infos.items():
        if v["dtype"] not in _FLOATS:
            continue
        itemsize = dtypes.of(dtype).itemsize if dtype is not None else _FLOATS[v["dtype"]]
        if name in experts.consumed:
            itemsizes[name] = itemsize
            continue
        m = _LAYER.match(name)
        if m is None or len(v["shape"]) != 2:
            continue
        layers[m.group(1)] = layers.get(m.group(1), 0) + math.prod(v["shape"]) * itemsize
    blocks = [*layers.values()]
    if len(itemsizes) == len(experts.consumed):  # (experts of other dtypes stay plain)
        blocks += experts.expert_bytes(itemsizes).values()
    return max(blocks, default=0)


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
    items: Iterator[tuple[str | ExpertPiece, torch.Tensor]],
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
    Fused expert parameters ("<experts>.gate_up_proj" [E, 2I, H], "<experts>.down_proj") are
    compressed in one piece per expert, "<name>[e]" of value ``t[e]``; an item named by an
    :class:`ExpertPiece` is one such piece already (its entry gathers the pieces of this shard:
    the others are in other shards, joined by :func:`merge_entries`). ``shard_name`` is the
    output shard the entries point to; ``bar`` counts weights done.
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

    def add(piece: str, t: torch.Tensor) -> None:
        batch.append((piece, t))
        if sum(x.numel() for _, x in batch) >= batch_weights:
            flush()

    def entry(name: str, shape: tuple[int, ...], t: torch.Tensor, pieces: list) -> Entry:
        return Entry(name, "compressed", shape, dtypes.of(t.dtype).name, pieces=pieces)

    for name, t in items:
        if isinstance(name, ExpertPiece):  # one expert's piece: [2I, H] or [H, I]
            t = t if dtype is None else t.to(dtype)
            assert tuple(t.shape) == name.shape, (name.key, t.shape, name.shape)
            e = entries.setdefault(name.fused, entry(name.fused, name.fused_shape, t, []))
            e.pieces.append((name.key, shard_name, name.expert, name.expert + 1))
            add(name.key, t)
        elif _compressible(t) and t.dim() == 3 and fused_param(name) is not None:
            t = t if dtype is None else t.to(dtype)
            keys = [piece_key(name, i) for i in range(t.shape[0])]
            located = [(k, shard_name, i, i + 1) for i, k in enumerate(keys)]
            entries[name] = entry(name, tuple(t.shape), t, located)
            for i, k in enumerate(keys):
                add(k, t[i])
        elif _compressible(t):
            t = t if dtype is None else t.to(dtype)
            pieces = _row_pieces(tuple(t.shape), t.element_size(), max_piece_bytes)
            names = [name] if len(pieces) == 1 else [f"{name}[{i}]" for i in range(len(pieces))]
            located = [(pn, shard_name, a, b) for pn, (a, b) in zip(names, pieces, strict=True)]
            entries[name] = entry(name, tuple(t.shape), t, located)
            for pn, (a, b) in zip(names, pieces, strict=True):
                add(pn, t[a:b] if len(pieces) > 1 else t)
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


def merge_entries(into: dict[str, Entry], new: dict[str, Entry]) -> None:
    """Add one shard's (or one worker's) entries to ``into``. A fused expert parameter's pieces
    may be written by several: its entries are joined, pieces in order along dim 0."""
    for name, e in new.items():
        have = into.get(name)
        if have is None or have.kind != "compressed" or e.kind != "compressed":
            into[name] = replace(e, pieces=None if e.pieces is None else list(e.pieces))
            continue
        joined = {tuple(p) for p in have.pieces} | {tuple(p) for p in e.pieces}
        have.pieces = sorted(joined, key=lambda p: p[2])


@dataclass(frozen=True)
class ShardWork:
    """What one output shard holds: its input shard's ``tensors`` (those that are not expert
    projections) and the expert ``pieces`` whose first source tensor is in that shard; ``files``
    says where every tensor it reads is (a piece's other sources may be in other shards)."""

    tensors: tuple[str, ...]
    pieces: tuple[ExpertPiece, ...]
    files: dict[str, Path]

    def items(self, src: SourceFiles) -> Iterator[tuple[str | ExpertPiece, torch.Tensor]]:
        """The tensors read one at a time, then the pieces, one expert at a time."""
        for name in self.tensors:
            yield name, src.get(name)
        for p in self.pieces:
            yield p, src.piece(p)

    def reads(self, shard: Path) -> dict[str, dict]:
        """Size and time of each other input shard this one's output reads (a resume key)."""
        return {p.name: _file_id(p) for p in sorted(set(self.files.values())) if p != shard}


def plan_shards(shards: list[Path], headers: list[dict]) -> list[ShardWork]:
    """The work of each input shard: its tensors, and the expert pieces anchored in it."""
    files = {n: s for s, h in zip(shards, headers, strict=True) for n in h if n != "__metadata__"}
    experts = find_experts(
        {n: info["shape"] for h in headers for n, info in h.items() if n in files}
    )
    anchored: dict[Path, list[ExpertPiece]] = {s: [] for s in shards}
    for pieces in experts.pieces.values():
        for p in pieces:
            anchored[files[p.sources[0].name]].append(p)
    works = []
    for shard, header in zip(shards, headers, strict=True):
        names = sorted(n for n in header if n in files and n not in experts.consumed)
        pieces = anchored[shard]
        reads = set(names) | {s.name for p in pieces for s in p.sources}
        works.append(ShardWork(tuple(names), tuple(pieces), {n: files[n] for n in sorted(reads)}))
    return works


def _encode_group(
    work: ShardWork,
    out_name: str,
    cfg: CodecConfig,
    dtype: torch.dtype | None,
    max_piece_bytes: int,
) -> tuple[dict, dict, dict]:
    """In a worker process: compress part of a shard's work (read from its own memory maps);
    results as (bytes as a numpy array, dtype name, shape), plain to pickle."""
    with SourceFiles(work.files) as src:
        r = compress_tensors(
            work.items(src), out_name, cfg, dtype, max_piece_bytes, None, tqdm(disable=True)
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
    work: ShardWork | None = None,
) -> dict:
    """One input shard → one output shard on disk (published atomically); returns the index
    entries of its tensors as JSON.

    ``work``: what the shard's output holds (:func:`plan_shards`; default: the shard alone,
    its experts complete in it). Without ``procs``, in the calling process (this one, or a
    worker converting shards side by side); with ``procs``, the work is divided among its
    processes by size and this process gathers and writes it (the same bytes either way).
    """
    if work is None:
        (work,) = plan_shards([shard], [read_safetensors_header(shard)[0]])
    if procs is None:
        with SourceFiles(work.files) as src:
            result = compress_tensors(
                work.items(src),
                out.name,
                cfg,
                dtype,
                max_piece_bytes,
                shared_pool(),
                tqdm(disable=True),
            )
    else:
        result = _gather(shard, work, out.name, cfg, dtype, max_piece_bytes, procs)
    write_safetensors(result.tensors, result.metadata, out)
    return {k: e.to_json() for k, e in result.entries.items()}


def _gather(
    shard: Path,
    work: ShardWork,
    out_name: str,
    cfg: CodecConfig,
    dtype: torch.dtype | None,
    max_piece_bytes: int,
    procs: WorkerProcesses,
) -> ShardResult:
    """A shard's work compressed in groups of about equal bytes, one a process."""
    header, _ = read_safetensors_header(shard)
    sizes: dict[str | ExpertPiece, int] = {n: _nbytes(header[n]) for n in work.tensors}
    for p in work.pieces:  # its first source is in this shard: its dtype is the piece's
        sizes[p] = math.prod(p.shape) * _itemsize(header[p.sources[0].name])
    groups: list[list[str | ExpertPiece]] = [[] for _ in range(min(procs.n, len(sizes)))]
    load = [0] * len(groups)
    for item in sorted(sizes, key=lambda k: -sizes[k]):  # largest first, to the least loaded
        i = load.index(min(load))
        groups[i].append(item)
        load[i] += sizes[item]
    args = (out_name, cfg, dtype, max_piece_bytes)
    jobs = []
    for g in groups:
        names = tuple(n for n in g if isinstance(n, str))
        pieces = tuple(p for p in g if isinstance(p, ExpertPiece))
        reads = set(names) | {s.name for p in pieces for s in p.sources}
        part = ShardWork(names, pieces, {n: work.files[n] for n in sorted(reads)})
        jobs.append(Job(_encode_group, (part, *args), f"{shard} ({len(g)} tensors)"))
    result = ShardResult({}, {}, {})
    for _, (arrays, metadata, entries) in procs.run(jobs):
        for k, (a, dt, shape) in arrays.items():
            result.tensors[k] = torch.from_numpy(a).view(dtypes.of_name(dt).dtype).view(shape)
        result.metadata.update(metadata)
        merge_entries(result.entries, {k: Entry.from_json(k, v) for k, v in entries.items()})
    return result


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
    works = dict(zip(shards, plan_shards(shards, headers), strict=True))  # checks the experts
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
            and done.get("reads", {}) == works[shard].reads(shard)
            and out.exists()
            and (_file_id(out)["size"] == done["size"])
        ):
            merge_entries(entries, {k: Entry.from_json(k, v) for k, v in done["entries"].items()})
            bar.update(done["weights"])
            log.info("%s: already converted, skipped", shard.name)
        else:
            todo.append(shard)

    def record(shard: Path, shard_entries: dict) -> None:
        merge_entries(entries, {k: Entry.from_json(k, v) for k, v in shard_entries.items()})
        state["done"][shard.name] = {
            "source": _file_id(shard),
            "reads": works[shard].reads(shard),
            "size": _file_id(dst / out_names[shard])["size"],
            "weights": weights[shard],
            "entries": shard_entries,
        }
        write_json(progress_path, state)
        bar.update(weights[shard])

    args = (cfg, dtype, max_piece_bytes)
    with WorkerProcesses(workers) as procs:
        if len(todo) == 1 and workers > 1:  # a lone shard: its tensors divided among them
            out = dst / out_names[todo[0]]
            record(todo[0], convert_shard(todo[0], out, *args, procs, works[todo[0]]))
        else:  # whole shards, side by side
            jobs = [
                Job(convert_shard, (s, dst / out_names[s], *args, None, works[s]), str(s))
                for s in todo
            ]
            for i, shard_entries in procs.run(jobs):
                record(todo[i], shard_entries)
    bar.close()
    return _finish(dst, settings, entries, src if src.is_dir() else src.parent)
