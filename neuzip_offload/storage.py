"""Where compressed planes sit in files, and the positional read that fetches one.

Part of the format layer: checkpoint.py writes shards and names each plane's location, the
scheduler's disk tier (scheduler/reader.py) reads them back into pinned buffers. Neither the
checkpoint nor this module knows the scheduler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

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
