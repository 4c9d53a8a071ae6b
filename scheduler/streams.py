"""The one owner of the executor's streams and events, with an explicit lifetime.

On CUDA: a copy stream (host → device) and a decode stream beside the compute stream (whatever
stream is current when a block runs). Without CUDA the stand-ins from neuzip_offload.backend run
work at once and their events are always complete, so the same schedule runs on the CPU.
"""

from __future__ import annotations

import torch

from neuzip_offload import backend


class Streams:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy = backend.new_stream(device)
        self.decode = backend.new_stream(device)
        self._closed = False

    def event(self):
        """A new event (timing-capable on CUDA, so stats can read durations)."""
        if self.cuda:
            return torch.cuda.Event(enable_timing=True)
        return backend.CpuEvent()

    def compute(self):
        """The stream the model runs on right now."""
        return backend.current_stream(self.device)

    def on(self, stream):
        return backend.on_stream(stream)

    def close(self) -> None:
        """Wait for work in flight on the side streams, then drop them."""
        if self._closed:
            return
        self.copy.synchronize()
        self.decode.synchronize()
        self._closed = True
