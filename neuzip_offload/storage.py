"""safetensors files on disk: headers, deterministic atomic writes, and positional plane reads.

Part of the format layer. The checkpoint reader (checkpoint.py) reads shard headers and names
each plane's location, the scheduler's disk tier (scheduler/reader.py) reads planes back into
pinned buffers with :func:`pread_into`, and every writer (conversion, save_compressed, the
checkpoint index) publishes its files through :func:`atomic_write`. Nothing here knows the
scheduler or the checkpoint layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from . import dtypes
from .compressed import DamagedDataError


@dataclass(frozen=True)
class PlaneLocation:
    """Where a plane's bytes sit in a file (a checkpoint shard)."""

    path: Path
    offset: int  # absolute, in bytes
    nbytes: int


def pread_into(loc: PlaneLocation, out: torch.Tensor) -> None:
    """Read a plane from disk straight into ``out`` (uint8, CPU, e.g. a pinned buffer); a short
    read (a truncated file) raises DamagedDataError naming the file."""
    view = memoryview(out.numpy()).cast("B")
    with open(loc.path, "rb", buffering=0) as f:
        got = os.preadv(f.fileno(), [view], loc.offset)
    if got != loc.nbytes:
        raise DamagedDataError(f"{loc.path.name}: truncated: read {got} of {loc.nbytes} bytes")


# ---------------------------------------------------------------------------------------------
# publishing files atomically
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temporary file beside it, published whole or not at all.

    On a clean exit the file is flushed and fsync'd, renamed over ``path``, and the directory is
    fsync'd, so that after a crash or power loss ``path`` is the old file or the new one, and a
    rename that returned stays done. On an exception nothing is renamed.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` (a rename into it) durable. A no-op where directories
    cannot be opened (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: object) -> None:
    """``obj`` as indented JSON with sorted keys, published atomically."""
    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# safetensors files
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


def write_safetensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path
) -> None:
    """Write a safetensors file (atomically), byte for byte the same for the same content.

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
            "dtype": dtypes.of(t.dtype).safetensors,
            "shape": list(t.shape),
            "data_offsets": [pos, pos + n],
        }
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            t = tensors[k].contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
