"""The tiers a compressed block can live in, best first: the vocabulary of plans.

    device             decoded and resident on the device: no copy, no decode
    device-compressed  compressed and resident on the device: decoded into a slot on each use
    host               compressed in (pinned) host memory: copied to a staging buffer and decoded
    disk               compressed in its checkpoint file: read ahead into pinned host staging
                       by a background reader, then as host (only when the host budget is full)

A leaf of the scheduler: plan.py assigns blocks to these and experts_plan.py prices routed blocks
by them; the store and the executor act on them.
"""

from __future__ import annotations

DEVICE = "device"
DEVICE_COMPRESSED = "device-compressed"
HOST = "host"
DISK = "disk"
TIERS = (DEVICE, DEVICE_COMPRESSED, HOST, DISK)
