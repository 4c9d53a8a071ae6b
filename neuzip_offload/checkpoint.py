"""Compressed checkpoints: safetensors shards of planes, an index, streaming conversion.

A checkpoint directory::

    neuzip.index.json                      format, version, settings, and every tensor's entry
    neuzip-00001-of-00004.safetensors      planes as uint8 tensors "<name>::exp", "::meta", ...
    config.json, tokenizer files ...       copied from the source, so the model can be rebuilt

Each compressed tensor (or row piece "<name>[i]" of a large one) has its header in the shard's
safetensors metadata; tensors left as they are (norms, biases, integer buffers) are stored
plain, with a CRC-32 in the index. Any safetensors reader opens the shards.

Conversion streams: one input shard is read at a time (memory-mapped), each output shard is
written to a temporary file and renamed, and a progress file records finished shards, so an
interrupted conversion resumes where it stopped; the input is only read.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import pieces as piece_rule
from .codec import compress_many
from .compressed import PLANE_NAMES, CompressedTensor, DamagedDataError, Header
from .config import CodecConfig
from .storage import PlaneLocation, pread_into
from .workers import process_context, shared_pool, usable_cpus

log = logging.getLogger(__name__)

INDEX_NAME = "neuzip.index.json"
PROGRESS_NAME = ".neuzip-progress.json"
FORMAT_NAME = "neuzip-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_PIECE_BYTES = 256 * 2**20  # row pieces when no layers are recognized (see _layer_bytes)
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPES = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or written as asked (not damage)."""


# ---------------------------------------------------------------------------------------------
# safetensors headers, read directly (offsets for reading planes from disk)
# ---------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts). Raises DamagedDataError if cut short."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise DamagedDataError(f"{path.name}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise DamagedDataError(f"{path.name}: truncated (header of {n} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedDataError(f"{path.name}: safetensors header is damaged ({e})") from e
    data_start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + end > size:
        raise DamagedDataError(
            f"{path.name}: truncated: {size} bytes on disk, its header needs {data_start + end}"
        )
    return header, data_start


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
        dtype = _torch_dtype(info["dtype"])
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


def _torch_dtype(st: str) -> torch.dtype:
    return {
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F32": torch.float32,
        "F64": torch.float64,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }[st]


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _atomic_write_json(path: Path, obj) -> None:
    """Write, flush to disk, then rename: a crash leaves the old file or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_ST_NAMES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file, byte for byte the same for the same content.

    (safetensors' own writer orders the metadata as a hash map does, differently in every
    process, so a resumed conversion would not reproduce its files.) Tensors go largest element
    size first, then by name, so every tensor stays aligned to its element size; the header is
    padded with spaces to 8 bytes, as the format allows.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    pos = 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + n],
        }
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            t = tensors[k].contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _row_pieces(
    shape: tuple[int, ...], itemsize: int, max_piece_bytes: int
) -> list[tuple[int, int]]:
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    return piece_rule.cut(shape[0], math.prod(shape) * itemsize, max_piece_bytes)


_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.12.mlp.up_proj.weight" → "model.layers.12"


def _layer_bytes(headers: list[dict]) -> int:
    """The largest layer's bytes, grouping tensors by their "<prefix>.<number>." (0: none)."""
    layers: dict[str, int] = {}
    for h in headers:
        for name, v in h.items():
            m = _LAYER.match(name) if name != "__metadata__" else None
            if m:
                size = math.prod(v["shape"]) * _ST_DTYPES.get(v["dtype"], 4)
                layers[m.group(1)] = layers.get(m.group(1), 0) + size
    return max(layers.values(), default=0)


def _compressible(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16, torch.float32) and t.dim() >= 2


@dataclass
class _ShardResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    entries: dict[str, Entry]


def _compress_shard(
    items: Iterator[tuple[str, torch.Tensor]],
    shard_name: str,
    cfg: CodecConfig,
    dtype: torch.dtype | None,
    max_piece_bytes: int,
    pool: Executor | None,
    bar,
    batch_weights: int = 1 << 25,
) -> _ShardResult:
    """Compress (or keep) every tensor of one input shard, in batches for the rANS encoder."""
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
                name, "compressed", tuple(t.shape), str(t.dtype)[6:], pieces=located
            )
            for pn, (a, b) in zip(names, pieces, strict=True):
                batch.append((pn, t[a:b] if len(pieces) > 1 else t))
                if sum(x.numel() for _, x in batch) >= batch_weights:
                    flush()
        else:
            data = t.contiguous()
            tensors[name] = data
            crc = zlib.crc32(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else 0
            entries[name] = Entry(name, "plain", tuple(t.shape), str(t.dtype)[6:], shard_name, crc)
            bar.update(t.numel())
    flush()
    return _ShardResult(tensors, metadata, entries)


def _encode_group(
    shard: Path, names: list[str], out_name: str, cfg: CodecConfig, dtype, max_piece_bytes: int
) -> tuple[dict, dict, dict]:
    """In a worker process: compress some tensors of a shard (read from its own memory map);
    results as numpy arrays (plain pickles, no shared-memory handles)."""
    from safetensors import safe_open

    torch.set_num_threads(1)
    with safe_open(str(shard), framework="pt") as f:
        r = _compress_shard(
            ((n, f.get_tensor(n)) for n in names),
            out_name,
            cfg,
            dtype,
            max_piece_bytes,
            None,
            _NoBar(),
        )
    arrays = {
        k: (t.reshape(-1).contiguous().view(torch.uint8).numpy(), str(t.dtype)[6:], tuple(t.shape))
        for k, t in r.tensors.items()
    }
    return arrays, r.metadata, {k: e.to_json() for k, e in r.entries.items()}


class _NoBar:
    def update(self, _n: int) -> None:
        return None


def _convert_shard(shard: Path, out_name, cfg, dtype, max_piece_bytes, pool, bar, workers):
    """One input shard → its output tensors, in this process or split among ``workers``."""
    from safetensors import safe_open

    header, _ = read_safetensors_header(shard)
    sizes = {
        k: math.prod(v["shape"]) * _ST_DTYPES.get(v["dtype"], 4)
        for k, v in header.items()
        if k != "__metadata__"
    }
    if workers <= 1 or len(sizes) < 2:
        with safe_open(str(shard), framework="pt") as f:
            return _compress_shard(
                ((n, f.get_tensor(n)) for n in f.keys()),  # noqa: SIM118
                out_name,
                cfg,
                dtype,
                max_piece_bytes,
                pool,
                bar,
            )
    groups: list[list[str]] = [[] for _ in range(workers)]
    load = [0] * workers
    for name in sorted(sizes, key=lambda k: -sizes[k]):  # largest first, to the least loaded
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += sizes[name]
    result = _ShardResult({}, {}, {})
    with ProcessPoolExecutor(max_workers=workers, mp_context=process_context()) as procs:
        futures = [
            procs.submit(_encode_group, shard, g, out_name, cfg, dtype, max_piece_bytes)
            for g in groups
            if g
        ]
        for fut, g in zip(futures, [g for g in groups if g], strict=True):
            arrays, metadata, entries = fut.result()
            for k, (a, dt, shape) in arrays.items():
                result.tensors[k] = torch.from_numpy(a).view(getattr(torch, dt)).view(shape)
            result.metadata.update(metadata)
            result.entries.update({k: Entry.from_json(k, v) for k, v in entries.items()})
            bar.update(sum(math.prod(header[n]["shape"]) for n in g))
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


def _settings(cfg: CodecConfig, dtype: torch.dtype | None, max_piece_bytes: int) -> dict:
    return {
        "mode": cfg.mode,
        "codec": cfg.codec,
        "mantissa_bits": cfg.mantissa_bits,
        "block_size": cfg.block_size,
        "dtype": None if dtype is None else str(dtype)[6:],
        "max_piece_bytes": max_piece_bytes,
    }


def _file_id(p: Path) -> dict:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _finish(
    dst: Path,
    settings: dict,
    entries: dict[str, Entry],
    src_dir: Path | None,
    aliases: dict[str, str] | None = None,
) -> Path:
    if src_dir is not None and src_dir.is_dir():
        for name in COPIED_FILES:
            if (src_dir / name).exists():
                shutil.copyfile(src_dir / name, dst / name)
    _atomic_write_json(
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
    streams through slots no larger than a layer (default: the largest layer, recognized by the
    tensor names; 256 MiB if none). ``workers``: processes (the rANS encoder is single-threaded
    Python, so processes, not threads): shards are converted side by side, or a lone shard's
    tensors are split between them. Default: one per core when there is over 64 MB to convert.
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
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    cfg = CodecConfig(mode=mode, codec=codec, mantissa_bits=mantissa_bits, block_size=block_size)
    shards = source_shards(src)
    headers = [read_safetensors_header(s)[0] for s in shards]
    if max_piece_bytes is None:
        max_piece_bytes = _layer_bytes(headers) or DEFAULT_PIECE_BYTES
    dst.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, dtype, max_piece_bytes)
    progress_path = dst / PROGRESS_NAME
    state = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    if state.get("settings") != settings:
        state = {"settings": settings, "done": {}}
    weights, nbytes = {}, {}
    for s, h in zip(shards, headers, strict=True):
        items = [v for k, v in h.items() if k != "__metadata__"]
        weights[s] = sum(math.prod(v["shape"]) for v in items)
        nbytes[s] = sum(math.prod(v["shape"]) * _ST_DTYPES.get(v["dtype"], 4) for v in items)
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
        _atomic_write_json(progress_path, state)
        bar.update(weights[shard])

    args = (cfg, dtype, max_piece_bytes)
    if workers > 1 and len(todo) > 1:  # whole shards side by side
        with ProcessPoolExecutor(
            max_workers=min(workers, len(todo)), mp_context=process_context()
        ) as procs:
            futures = {
                procs.submit(_convert_file, s, dst / out_names[s], *args, 1): s for s in todo
            }
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
    else:
        for shard in todo:
            record(shard, _convert_file(shard, dst / out_names[shard], *args, workers))
    bar.close()
    return _finish(dst, settings, entries, src if src.is_dir() else src.parent)


def _convert_file(shard: Path, out: Path, cfg, dtype, max_piece_bytes, workers: int) -> dict:
    """One input shard → one output shard on disk (atomically); returns its entries as JSON."""
    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)  # one process per core
    result = _convert_shard(
        shard, out.name, cfg, dtype, max_piece_bytes, shared_pool(), _NoBar(), workers
    )
    _atomic_save(result.tensors, result.metadata, out)
    return {k: e.to_json() for k, e in result.entries.items()}
