"""Where bytes live: packed compressed blocks, slots for decoded blocks, and the accounting.

A block's compressed tensors are packed into one contiguous uint8 buffer (planes aligned to 64
bytes), so a host → device copy is a single transfer and the same layout rebinds the tensors to
whichever buffer holds the bytes (pinned host, device-resident, or a staging buffer). A slot is a
device buffer that holds one decoded block; its weights are views at aligned offsets.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuzip_offload import backend
from neuzip_offload.compressed import PLANE_NAMES, CompressedTensor, DamagedDataError, planes_crc
from neuzip_offload.storage import PlaneLocation, pread_into

log = logging.getLogger(__name__)

PLANE_ALIGN = 64
SLOT_ALIGN = 256


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def read_packed(
    cts: list[CompressedTensor],
    layout: PackedLayout,
    locations: list[dict[str, PlaneLocation]],
    buf: torch.Tensor,
) -> list[CompressedTensor]:
    """Read every plane of a block from disk into ``buf`` at its packed offsets, then check each
    tensor (sizes, CRC-32, coder index): a damaged file raises DamagedDataError naming it."""
    for entry, locs, ct in zip(layout.offsets, locations, cts, strict=True):
        for k, (off, n) in entry.items():
            loc = locs.get(k)
            if loc is None or loc.nbytes != n:
                raise DamagedDataError(f"{ct.name}: plane {k!r} is missing or mis-sized on disk")
            pread_into(loc, buf[off : off + n])
    bound = bind(cts, layout, buf)
    for ct, locs in zip(bound, locations, strict=True):
        files = sorted({loc.path.name for loc in locs.values()})
        try:
            if planes_crc(ct.planes) != ct.header.crc:
                raise DamagedDataError(f"{ct.name}: the data fails its checksum")
            problem = ct.structure_problem()
            if problem:
                raise DamagedDataError(f"{ct.name}: {problem}")
        except DamagedDataError as e:
            raise DamagedDataError(f"{', '.join(files)}: {e}") from None
    return bound


class HostArena:
    """Host memory of exactly the planned size, handed out in aligned pieces: one buffer from
    ``backend.empty_pinned`` (page-locked in place, never rounded up) for the host-tier blocks
    and the disk reader's staging. Plain memory without CUDA."""

    def __init__(self, nbytes: int):
        self.buf = backend.empty_pinned(nbytes)
        self._pos = 0

    @staticmethod
    def size(parts: list[int]) -> int:
        """Bytes an arena needs to hand out ``parts`` (each aligned to PLANE_ALIGN)."""
        return sum(_align(n, PLANE_ALIGN) for n in parts)

    def take(self, nbytes: int) -> torch.Tensor:
        start = self._pos
        end = start + _align(nbytes, PLANE_ALIGN)
        if end > self.buf.numel():
            raise BudgetExceededError(
                f"host arena: {nbytes} more bytes do not fit ({start} of {self.buf.numel()} used)"
            )
        self._pos = end
        return self.buf[start : start + nbytes]


class BudgetExceededError(RuntimeError):
    """The executor was about to hold more device bytes than its budget (a planner bug)."""


@dataclass(frozen=True)
class PackedLayout:
    """Plane offsets of several compressed tensors inside one buffer."""

    offsets: tuple[dict[str, tuple[int, int]], ...]  # per tensor: plane → (offset, nbytes)
    nbytes: int

    @classmethod
    def of(cls, cts: list[CompressedTensor]) -> PackedLayout:
        pos, offsets = 0, []
        for ct in cts:
            entry = {}
            for k in PLANE_NAMES:
                if k in ct.planes:
                    pos = _align(pos, PLANE_ALIGN)
                    entry[k] = (pos, ct.planes[k].numel())
                    pos += ct.planes[k].numel()
            offsets.append(entry)
        return cls(tuple(offsets), _align(pos, PLANE_ALIGN))


def pack(cts: list[CompressedTensor], alloc: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Copy the planes of ``cts`` into one buffer from ``alloc(nbytes)``."""
    layout = PackedLayout.of(cts)
    buf = alloc(layout.nbytes)
    for ct, entry in zip(cts, layout.offsets, strict=True):
        for k, (off, n) in entry.items():
            buf[off : off + n].copy_(ct.planes[k].reshape(-1))
    return buf


def bind(
    cts: list[CompressedTensor], layout: PackedLayout, buf: torch.Tensor
) -> list[CompressedTensor]:
    """The tensors again, their planes now views into ``buf`` (no copies)."""
    return [
        ct.with_planes({k: buf[off : off + n] for k, (off, n) in entry.items()})
        for ct, entry in zip(cts, layout.offsets, strict=True)
    ]


@dataclass(frozen=True)
class SlotEntry:
    """One weight of a block: where its decoded values sit in a slot."""

    key: str
    shape: torch.Size
    dtype: torch.dtype
    offset: int  # bytes, SLOT_ALIGN-aligned

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        raw = buf[self.offset : self.offset + self.nbytes]
        return raw.view(self.dtype).view(self.shape)


def slot_layout(cts: list[CompressedTensor], keys: list[str]) -> tuple[list[SlotEntry], int]:
    """Aligned offsets of each decoded weight in a slot, and the bytes the slot needs."""
    entries, pos = [], 0
    for key, ct in zip(keys, cts, strict=True):
        pos = _align(pos, SLOT_ALIGN)
        entries.append(SlotEntry(key, ct.shape, ct.dtype, pos))
        pos += ct.decoded_nbytes
    return entries, _align(pos, SLOT_ALIGN)


class Accountant:
    """Bytes the executor holds on the device, by purpose, never above ``limit``."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None):
        self.limit = limit
        self.held: dict[str, int] = {}
        self.peak = 0
        self._on_change = on_change

    @property
    def total(self) -> int:
        return sum(self.held.values())

    def hold(self, purpose: str, nbytes: int) -> None:
        if self.total + nbytes > self.limit:
            raise BudgetExceededError(
                f"holding {nbytes} more bytes for {purpose} would exceed the device budget "
                f"({self.total} + {nbytes} > {self.limit})"
            )
        self.held[purpose] = self.held.get(purpose, 0) + nbytes
        self.peak = max(self.peak, self.total)
        if self._on_change:
            self._on_change(self.total)

    @contextlib.contextmanager
    def transient(self, purpose: str, nbytes: int, limit: int | None = None):
        """Bytes held for the duration of a block, against ``limit`` (default: the budget)."""
        cap = self.limit if limit is None else limit
        if self.total + nbytes > cap:
            raise BudgetExceededError(f"{purpose}: {self.total} + {nbytes} > {cap} bytes")
        self.held[purpose] = self.held.get(purpose, 0) + nbytes
        self.peak = max(self.peak, self.total)
        try:
            yield
        finally:
            self.held[purpose] -= nbytes

    def release(self, purpose: str, nbytes: int) -> None:
        self.held[purpose] = self.held.get(purpose, 0) - nbytes
        if self._on_change:
            self._on_change(self.total)
