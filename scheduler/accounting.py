"""What the executor may hold: device bytes by purpose under the budget, and the host arena.

The plan says how many bytes each purpose gets (slots, staging, residents, the decode workspace,
the scratch of training); the Accountant holds every device allocation against the budget and
raises BudgetExceededError rather than let the working set grow past it — on the CPU backend,
where no allocator reports device memory, its peak is the proof a GPU run stays within
max_gpu_mem. The HostArena hands out the planned pinned host memory (host-tier blocks and the
disk reader's staging ring) from one buffer of exactly that size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from neuzip_offload import backend

from .layout import PLANE_ALIGN, align


class BudgetExceededError(RuntimeError):
    """The executor was about to hold more device bytes than its budget (a planner bug)."""


class Accountant:
    """Bytes the executor holds on the device, by purpose, never above ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held: dict[str, int] = {}
        self.peak = 0

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

    def allocate(self, purpose: str, nbytes: int, device: torch.device) -> torch.Tensor:
        """Hold ``nbytes`` for ``purpose`` and return a uint8 buffer of that size on ``device``."""
        self.hold(purpose, nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    @contextlib.contextmanager
    def transient(self, purpose: str, nbytes: int, limit: int | None = None) -> Iterator[None]:
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
        return sum(align(n, PLANE_ALIGN) for n in parts)

    def take(self, nbytes: int) -> torch.Tensor:
        start = self._pos
        end = start + align(nbytes, PLANE_ALIGN)
        if end > self.buf.numel():
            raise BudgetExceededError(
                f"host arena: {nbytes} more bytes do not fit ({start} of {self.buf.numel()} used)"
            )
        self._pos = end
        return self.buf[start : start + nbytes]
