"""The one place that knows whether CUDA is present, and the CPU stand-ins used when it is not.

Pinned memory, streams and events exist only with CUDA. Without it, pinning returns the tensor as
it is, a stream runs work at once on the calling thread, and an event is always complete. The
scheduler owns the stream and event objects (scheduler/streams.py); this module only makes them.

The stand-ins have a checking mode (``checking()`` or NEUZIP_CHECK_STREAMS=1, off by default):
they then keep vector clocks so that the executor's declared buffer accesses are checked for
stream order, and host synchronizations are counted (neuzip_offload/streamcheck.py).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator

import torch

from .streamcheck import ENV_VAR, HostSync, StreamChecker, StreamOrderError

__all__ = [
    "CpuEvent",
    "CpuStream",
    "HostSync",
    "StreamChecker",
    "StreamOrderError",
    "checker",
    "checking",
    "current_stream",
    "empty_pinned",
    "has_cuda",
    "new_event",
    "new_stream",
    "on_stream",
    "pin",
]


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pin(t: torch.Tensor) -> torch.Tensor:
    """Page-locked copy of a CPU tensor; the tensor itself where CUDA (hence pinning) is absent."""
    if t.device.type != "cpu":
        raise ValueError(f"only CPU tensors can be pinned, got one on {t.device}")
    if not has_cuda() or t.is_pinned():
        return t
    out = empty_pinned(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def empty_pinned(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 host buffer of exactly ``nbytes``, page-locked where CUDA is present.

    torch's pinned allocator (``pin_memory=True``) rounds every allocation up to a power of two,
    up to twice the bytes asked for; optimizer state, host-tier blocks and staging would pay that.
    So a plain allocation is page-locked in place with cudaHostRegister, and unlocked when its
    storage is freed (the callback runs before the memory is returned)."""
    if not has_cuda() or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8)
    # Registration locks whole pages, and two registrations may not share a page: lock only
    # pages of our own, the aligned middle of an allocation with a page to spare at each end.
    span = -(-nbytes // _PAGE) * _PAGE
    whole = torch.empty(span + 2 * _PAGE, dtype=torch.uint8)
    start = -whole.data_ptr() % _PAGE
    ptr = whole.data_ptr() + start
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(ptr, span, 0))
    weakref.finalize(whole.untyped_storage(), _unregister, ptr)
    return whole[start : start + nbytes]


_PAGE = 4096


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class CpuEvent:
    """Stand-in for torch.cuda.Event: work on a CPU stand-in stream is done when recorded.

    In checking mode (see ``checking``) it carries the recording stream's clock."""

    def __init__(self, name: str = "event"):
        self.name = name

    def record(self, stream: object | None = None) -> None:
        if _checker is not None:
            _checker.record(self, stream, self.name)

    def wait(self, stream: object | None = None) -> None:
        if _checker is not None:
            _checker.wait_event(stream if stream is not None else _checker.current_stream(), self)

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        if _checker is not None:
            _checker.event_synchronize(self)


class CpuStream:
    """Stand-in for torch.cuda.Stream: work submitted on it runs at once, in order.

    In checking mode (see ``checking``) it keeps a vector clock, as if it ran on its own."""

    def __init__(self, name: str = "stream"):
        self.name = name

    def wait_event(self, event: object) -> None:
        if _checker is not None:
            _checker.wait_event(self, event)

    def wait_stream(self, stream: object) -> None:
        if _checker is not None:
            _checker.wait_stream(self, stream)

    def synchronize(self) -> None:
        if _checker is not None:
            _checker.stream_synchronize(self)


def new_stream(device: torch.device, name: str = "stream") -> torch.cuda.Stream | CpuStream:
    """A side stream; ``name`` labels the CPU stand-in in checking-mode reports."""
    if device.type == "cuda":
        return torch.cuda.Stream(device=device)
    return CpuStream(name)


def new_event(device: torch.device, name: str = "event") -> torch.cuda.Event | CpuEvent:
    if device.type == "cuda":
        return torch.cuda.Event()
    return CpuEvent(name)


def current_stream(device: torch.device) -> torch.cuda.Stream | CpuStream:
    if device.type == "cuda":
        return torch.cuda.current_stream(device)
    if _checker is not None:
        return _checker.current_stream()
    return CpuStream("compute")


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | CpuStream) -> Iterator[None]:
    """Make ``stream`` current for the block (for the CPU stand-in: only in checking mode)."""
    if isinstance(stream, CpuStream):
        if _checker is None:
            yield
        else:
            with _checker.on_stream(stream):
                yield
    else:
        with torch.cuda.stream(stream):
            yield


# -- checking mode -------------------------------------------------------------------------------
# The one checker in force (None: off). A module global, not a class-level cache: it is the
# process-wide switch of the stand-ins, set only by ``checking`` and NEUZIP_CHECK_STREAMS.
_checker: StreamChecker | None = None


def checker() -> StreamChecker | None:
    """The stream-order checker in force, or None when checking mode is off."""
    return _checker


def _start_checker() -> StreamChecker:
    c = StreamChecker()
    c.default_stream = CpuStream("compute")
    return c


@contextlib.contextmanager
def checking(count_syncs: bool = True) -> Iterator[StreamChecker]:
    """Checking mode of the CPU stand-ins for the block: every declared buffer access is checked
    for stream order (StreamOrderError on a hazard), and with ``count_syncs`` the host
    synchronizations of this thread are recorded in the checker's ``syncs``.

    Streams and events made before the block are checked as well (the stand-ins consult the
    checker on each call); CUDA streams are not checked."""
    global _checker
    previous = _checker
    _checker = _start_checker()
    try:
        if count_syncs:
            with _checker.counting():
                yield _checker
        else:
            yield _checker
    finally:
        _checker = previous


if os.environ.get(ENV_VAR, "").strip() not in ("", "0"):
    _checker = _start_checker()
