"""The decode rate the planner weighs device residency with: measured where it can be.

The planner trades a block's decode time against the device bytes residency costs, so its
decode rate must describe the decoder that runs, not a goal. On CUDA, dispatch times the decode
of the model's largest block (the one that sets the slot size) right after compressing: its
planes are copied to the device, decoded once to compile the kernels, then ``REPEATS`` times
between CUDA events; the median gives the rate. The result is cached per device, codec settings
and block size for the life of the process. A rate can also be given (``decode_gbps=``, e.g. from
the table in BENCHMARKS.md); the plan prints which it used.

Memory: the measurement holds one block compressed plus decoded on the device, less than the
plan's own floor (a slot and a staging buffer), and runs before the executor allocates.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch

from .codec import decode_into
from .config import CodecConfig
from .scheduler.layout import PackedLayout
from .scheduler.plan import BlockSpec
from .scheduler.reader import read_packed
from .scheduler.store import BlockData

log = logging.getLogger(__name__)

REPEATS = 5
# CPU: zstd exponents decoded by 2 threads with the merge (BENCHMARKS.md, codec table).
CPU_DECODE_GBPS = 1.5
# A CUDA target that cannot be measured (plan_model on a machine without the GPU): the modelled
# rate of today's decoder for a Llama-3-8B layer (reviews/gpu-audit.md §4), not a measurement.
GPU_DECODE_GBPS_MODELLED = 70.0


@dataclass(frozen=True)
class DecodeRate:
    gbps: float
    source: str  # how the number was obtained, printed with the plan

    @classmethod
    def default(cls, device: torch.device) -> DecodeRate:
        if device.type == "cuda":
            return cls(GPU_DECODE_GBPS_MODELLED, "default")
        return cls(CPU_DECODE_GBPS, "default")

    @classmethod
    def given(cls, gbps: float) -> DecodeRate:
        if isinstance(gbps, bool) or not isinstance(gbps, (int, float)) or gbps <= 0:
            raise ValueError(f"decode_gbps must be a positive number, got {gbps!r}")
        return cls(float(gbps), "given")

    def describe(self, device: torch.device) -> str:
        if self.source == "default" and device.type == "cuda":
            return "modelled for today's GPU decoder, not measured"
        if self.source == "default":
            return "CPU figure from BENCHMARKS.md"
        return self.source


_measured: dict[tuple, float] = {}


def measured_rate(
    blocks: list[BlockData], specs: list[BlockSpec], device: torch.device, cfg: CodecConfig
) -> DecodeRate:
    """The decode rate of the largest block on ``device`` (CUDA), timed; cached per process."""
    if not blocks:
        return DecodeRate.default(device)
    i = max(range(len(specs)), key=lambda j: specs[j].decoded_bytes)
    data, spec = blocks[i], specs[i]
    name = torch.cuda.get_device_name(device)
    key = (name, cfg.codec, cfg.mode, cfg.mantissa_bits, spec.decoded_bytes, spec.compressed_bytes)
    if key not in _measured:
        _measured[key] = _time_block(data, device)
        log.info("decode rate on %s: %.1f GB/s (block %s)", name, _measured[key], data.name)
    return DecodeRate(_measured[key], f"measured on {name} at dispatch, block {data.name}")


def _time_block(data: BlockData, device: torch.device) -> float:
    cts = data.cts
    if data.locations is not None:  # on disk: read it once into host memory
        layout = PackedLayout.of(cts)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        cts = read_packed(cts, layout, data.locations, buf)
    on_device = [ct.to(device) for ct in cts]
    outs = [torch.empty(ct.numel, dtype=ct.dtype, device=device) for ct in cts]
    stream = torch.cuda.current_stream(device)

    def decode_all() -> None:
        for ct, out in zip(on_device, outs, strict=True):
            decode_into(ct, out)

    decode_all()  # compiles the kernels for these shapes
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        decode_all()
        end.record(stream)
        end.synchronize()  # dispatch-time measurement: a host wait is intended here
        times.append(start.elapsed_time(end) / 1e3)
    decoded = sum(out.numel() * out.element_size() for out in outs)
    return decoded / statistics.median(times) / 1e9
