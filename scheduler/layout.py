"""Where bytes sit inside the executor's buffers: packed compressed blocks and decoded slots.

A block's compressed tensors are packed into one contiguous uint8 buffer (planes aligned to 64
bytes), so a host → device copy is a single transfer and the same layout rebinds the tensors to
whichever buffer holds the bytes (pinned host, device-resident, a staging buffer or the disk
reader's ring). A slot is a device buffer that holds one decoded block; its weights are views at
256-byte-aligned offsets. Pure arithmetic and views: nothing here allocates but ``pack``'s
``alloc``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuzip_offload.compressed import PLANE_NAMES, CompressedTensor

PLANE_ALIGN = 64
SLOT_ALIGN = 256


def align(n: int, a: int) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return (n + a - 1) // a * a


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
                    pos = align(pos, PLANE_ALIGN)
                    entry[k] = (pos, ct.planes[k].numel())
                    pos += ct.planes[k].numel()
            offsets.append(entry)
        return cls(tuple(offsets), align(pos, PLANE_ALIGN))


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
        pos = align(pos, SLOT_ALIGN)
        entries.append(SlotEntry(key, ct.shape, ct.dtype, pos))
        pos += ct.decoded_nbytes
    return entries, align(pos, SLOT_ALIGN)
