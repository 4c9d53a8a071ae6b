"""The one owner of the executor's streams and events, with an explicit lifetime.

On CUDA: a copy stream (host → device) and a decode stream beside the compute stream (whatever
stream is current when a block runs). Without CUDA the stand-ins from neuzip_offload.backend run
work at once and their events are always complete, so the same schedule runs on the CPU.

The executor also declares here which buffers it reads and writes on which stream, and which
block runs. That costs one test when checking mode is off; in checking mode
(``backend.checking()``) the CPU stand-ins check every such access for stream order and count
host synchronizations per block. On CUDA the declarations are ignored.
"""

from __future__ import annotations

import torch

from neuzip_offload import backend


class Streams:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy = backend.new_stream(device, "copy")
        self.decode = backend.new_stream(device, "decode")
        self._closed = False

    def event(self, name: str = "event", timing: bool = False):
        """A new event; ``timing``: on CUDA, one that stats can read durations from (costlier to
        record, so only the decode's start and end are). ``name`` labels the CPU stand-in in
        checking-mode reports."""
        if self.cuda:
            return torch.cuda.Event(enable_timing=timing)
        return backend.CpuEvent(name)

    def compute(self):
        """The stream the model runs on right now."""
        return backend.current_stream(self.device)

    def on(self, stream):
        return backend.on_stream(stream)

    @property
    def ordered(self) -> bool:
        """Whether events must be recorded and waited: on CUDA, and in checking mode (where the
        stand-ins check them); the plain CPU stand-ins run everything in order anyway."""
        return self.cuda or backend.checker() is not None

    # -- declarations for checking mode ----------------------------------------------------------
    def read(self, t: torch.Tensor, stream, purpose: str) -> None:
        """Work issued now on ``stream`` (None: this host thread itself) reads ``t``'s bytes."""
        c = backend.checker()
        if c is not None and not self.cuda:
            c.access(t, stream, False, purpose)

    def write(self, t: torch.Tensor, stream, purpose: str) -> None:
        """Work issued now on ``stream`` (None: this host thread itself) writes ``t``'s bytes."""
        c = backend.checker()
        if c is not None and not self.cuda:
            c.access(t, stream, True, purpose)

    def host_joined(self, t: torch.Tensor) -> None:
        """This thread has waited (a Future's result) for the host thread that wrote ``t``."""
        c = backend.checker()
        if c is not None and not self.cuda:
            c.host_joined(t)

    def entered(self, block: str) -> None:
        """Block ``block`` starts: host synchronizations from now on are counted against it."""
        c = backend.checker()
        if c is not None:
            c.entered(block)

    def exited(self, block: str) -> None:
        c = backend.checker()
        if c is not None:
            c.exited(block)

    def close(self) -> None:
        """Wait for work in flight on the side streams, then drop them."""
        if self._closed:
            return
        self.copy.synchronize()
        self.decode.synchronize()
        self._closed = True
