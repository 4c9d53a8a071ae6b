"""The one place that knows whether CUDA is present, and the CPU stand-ins used when it is not.

Pinned memory, streams and events exist only with CUDA. Without it, pinning returns the tensor as
it is, a stream runs work at once on the calling thread, and an event is always complete. The
scheduler owns the stream and event objects (scheduler/streams.py); this module only makes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pin(t: torch.Tensor) -> torch.Tensor:
    """Page-locked copy of a CPU tensor; the tensor itself where CUDA (hence pinning) is absent."""
    if t.device.type != "cpu":
        raise ValueError(f"only CPU tensors can be pinned, got one on {t.device}")
    if not has_cuda() or t.is_pinned():
        return t
    return t.pin_memory()


def empty_pinned(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 host buffer, pinned where CUDA is present."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=has_cuda())


class CpuEvent:
    """Stand-in for torch.cuda.Event: work on a CPU stand-in stream is done when recorded."""

    def record(self, stream: object | None = None) -> None:
        return None

    def wait(self, stream: object | None = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class CpuStream:
    """Stand-in for torch.cuda.Stream: work submitted on it runs at once, in order."""

    def wait_event(self, event: object) -> None:
        return None

    def wait_stream(self, stream: object) -> None:
        return None

    def synchronize(self) -> None:
        return None


def new_stream(device: torch.device) -> torch.cuda.Stream | CpuStream:
    if device.type == "cuda":
        return torch.cuda.Stream(device=device)
    return CpuStream()


def new_event(device: torch.device) -> torch.cuda.Event | CpuEvent:
    if device.type == "cuda":
        return torch.cuda.Event()
    return CpuEvent()


def current_stream(device: torch.device) -> torch.cuda.Stream | CpuStream:
    if device.type == "cuda":
        return torch.cuda.current_stream(device)
    return CpuStream()


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | CpuStream) -> Iterator[None]:
    """Make ``stream`` current for the block (a no-op for the CPU stand-in)."""
    if isinstance(stream, CpuStream):
        yield
    else:
        with torch.cuda.stream(stream):
            yield
