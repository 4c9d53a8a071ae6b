"""The blocks where the plan put them: each tier materialized at setup, and kept current.

The executor's input is one ``BlockData`` per planned block (its weights compressed, in memory or
as locations in checkpoint files). At setup the BlockStore puts each block in its tier:

    device             decoded once into resident tensors (its compressed bytes are let go);
                       a block dispatch never encoded (lossless, planned here from estimated
                       sizes) arrives decoded and is only moved to the device
    device_compressed  packed into one device buffer (on the CPU backend: pinned host memory,
                       counted as device)
    host               packed into a region of the pinned host arena, 1/64 spare when training
                       (on the CPU backend a block in memory is used in place: no second copy)
    disk               placeholders and file locations; the executor's DiskReader reads it

and afterwards keeps it current: training's re-encoded tensors replace a host block's and the
block is re-packed (in its region while it fits) before its next copy to the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from neuzip_offload import backend
from neuzip_offload.compressed import CompressedTensor
from neuzip_offload.storage import PlaneLocation

from .accounting import Accountant, HostArena
from .decoder import Decoder
from .layout import PackedLayout, SlotEntry, bind, pack, slot_layout
from .plan import DEVICE, DEVICE_COMPRESSED, HOST, Plan
from .reader import read_packed

log = logging.getLogger(__name__)


@dataclass
class BlockData:
    """What dispatch hands the executor for one block: its weights, compressed, in order.

    With ``locations`` the bytes are in files (a checkpoint) and the tensors' planes are
    placeholders of the right sizes (e.g. on the meta device). With ``decoded`` the block was
    never encoded: these are its weights (handed over: a contiguous tensor already on the
    device becomes the resident one), ``cts`` only stand-ins of the compressed tensors (planes
    on meta, sizes estimated), and the block can only be planned resident decoded.
    """

    name: str
    keys: list[str]
    cts: list[CompressedTensor]
    locations: list[dict[str, PlaneLocation]] | None = None
    decoded: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class BlockView:
    """What tests, benchmarks and tools may read of a block; the executor's state stays its own.

    ``cts``: the block's compressed tensors where their bytes are now (on the device for the
    device-compressed tier, in pinned or plain host memory for the host tier, placeholders
    for the disk and the resident decoded tiers)."""

    index: int
    name: str
    tier: str
    keys: tuple[str, ...]
    packed_nbytes: int  # bytes of one copy of its packed planes
    cts: tuple[CompressedTensor, ...]


@dataclass
class StoredBlock:
    """A block in its tier: the store's and the executor's record of it."""

    index: int
    name: str
    tier: str
    keys: list[str]
    entries: list[SlotEntry]  # where its decoded weights sit in a slot
    layout: PackedLayout
    cts: list[CompressedTensor]  # bound to host memory, or placeholders when on disk
    decoded_bytes: int
    locations: list[dict[str, PlaneLocation]] | None = None
    host_buf: torch.Tensor | None = None
    host_region: torch.Tensor | None = None  # where host_buf lies (re-encoded blocks may grow)
    last_copy: object | None = None  # copy-stream event of the last copy out of host_buf
    pending: list = field(default_factory=list)  # events of copies filling re-encoded planes
    dev_cts: list[CompressedTensor] | None = None
    resident: dict[str, torch.Tensor] | None = None

    @property
    def source_cts(self) -> list[CompressedTensor]:
        """The tensors a fetch decodes from (before any copy to staging)."""
        return self.dev_cts if self.tier == DEVICE_COMPRESSED else self.cts

    def wait_pending(self) -> None:
        """Wait for the copies that fill the block's re-encoded host planes (usually done)."""
        for ev in self.pending:
            ev.synchronize()  # returns at once for a finished copy
        self.pending.clear()


def _cpu_bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


def _host_copy(
    data: BlockData, layout: PackedLayout, alloc
) -> tuple[torch.Tensor, list[CompressedTensor]]:
    """The block's tensors in one host buffer from ``alloc``: packed, or read from disk."""
    if data.locations is None:
        buf = pack(data.cts, alloc)
        return buf, bind(data.cts, layout, buf)
    buf = alloc(layout.nbytes)
    return buf, read_packed(data.cts, layout, data.locations, buf)


class BlockStore:
    """Every block of the plan in its tier, the pinned host arena, and re-packing."""

    def __init__(
        self,
        plan: Plan,
        blocks: list[BlockData],
        accountant: Accountant,
        decoder: Decoder,
        copies: bool,
    ):
        self.plan = plan
        self.device = decoder.streams.device
        self.copies = copies
        self._accountant = accountant
        self._decoder = decoder
        self.blocks: list[StoredBlock] = []
        self._index: dict[str, int] = {}
        self._dirty: set[int] = set()  # host blocks whose tensors were re-encoded
        # pinned host memory, exactly what the plan counts: the host tier and the disk reader's
        # staging (plus 1/64 of each host block for re-encoded growth when training)
        self._grow = 0 if plan.options.device_compressed else 64
        hosted = [
            PackedLayout.of(d.cts).nbytes
            for d, t in zip(blocks, plan.tiers, strict=True)
            if t == HOST and (copies or d.locations is not None)
        ]
        regions = [n + (n // self._grow if self._grow else 0) for n in hosted]
        self._arena: HostArena | None = HostArena(
            HostArena.size(regions + [plan.disk_staging_bytes] * plan.n_disk_staging)
        )
        self.disk_buffers = [
            self._arena.take(plan.disk_staging_bytes) for _ in range(plan.n_disk_staging)
        ]
        for i, (data, spec, tier) in enumerate(zip(blocks, plan.blocks, plan.tiers, strict=True)):
            for k in data.keys:
                self._index[k] = i
            self.blocks.append(self._materialize(i, data, tier, spec.decoded_bytes))

    # -- setup -------------------------------------------------------------------------------
    def _materialize(self, i: int, data: BlockData, tier: str, decoded: int) -> StoredBlock:
        entries, _ = slot_layout(data.cts, data.keys)
        layout = PackedLayout.of(data.cts)
        b = StoredBlock(
            i, data.name, tier, list(data.keys), entries, layout, list(data.cts), decoded
        )
        b.locations = data.locations
        if data.decoded is not None and tier != DEVICE:
            raise ValueError(f"block {data.name!r} was never encoded: it cannot be {tier}")
        if data.decoded is not None:
            b.resident = self._adopt_resident(data)
        elif tier == DEVICE:
            b.resident = self._decode_resident(i, data, layout)
            b.cts = [ct.placeholder() for ct in data.cts]  # decoded now: keep no bytes
        elif tier == DEVICE_COMPRESSED and self.copies:
            _, host = _host_copy(data, layout, _cpu_bytes)
            alloc = self._accountant.allocate
            buf = pack(host, lambda n: alloc("resident compressed", n, self.device))
            b.dev_cts = bind(data.cts, layout, buf)
        elif tier == DEVICE_COMPRESSED:  # CPU backend: the same memory, counted as device
            self._accountant.hold("resident compressed", layout.nbytes)
            _, b.dev_cts = _host_copy(data, layout, backend.empty_pinned)
        elif tier == HOST and (self.copies or data.locations is not None):
            spare = layout.nbytes // self._grow if self._grow else 0
            b.host_region = self._arena.take(layout.nbytes + spare)
            b.host_buf, b.cts = _host_copy(data, layout, lambda n, r=b.host_region: r[:n])
        # (HOST on the CPU backend: the tensors as they are — nothing is copied from them)
        return b

    def _decode_resident(
        self, i: int, data: BlockData, layout: PackedLayout
    ) -> dict[str, torch.Tensor]:
        cts = data.cts
        if data.locations is not None:
            _, cts = _host_copy(data, layout, _cpu_bytes)
        out = {}
        for k, ct in zip(data.keys, cts, strict=True):
            self._accountant.hold("resident decoded", ct.decoded_nbytes)
            t = torch.empty(ct.numel, dtype=ct.dtype, device=self.device)
            if self.copies:
                # The compressed planes visit the device while they decode: at setup, when the
                # reserve for activations is still unused.
                limit = self.plan.options.device_bytes
                with self._accountant.transient("setup copy", ct.nbytes, limit):
                    self._decoder.decode(ct.to(self.device), t, i)
            else:
                self._decoder.decode(ct, t, i)
            out[k] = t.view(ct.shape)
        return out

    def _adopt_resident(self, data: BlockData) -> dict[str, torch.Tensor]:
        """A block that was never encoded: its weights become the resident tensors, as they are
        when contiguous on the device (no copy), else copied there (host → device at setup)."""
        here = torch.empty(0, device=self.device).device  # "cuda" names an index: compare that
        out = {}
        for k, ct, t in zip(data.keys, data.cts, data.decoded, strict=True):
            self._accountant.hold("resident decoded", ct.decoded_nbytes)
            if not (t.device == here and t.is_contiguous()):
                t = torch.empty(ct.shape, dtype=ct.dtype, device=self.device).copy_(t)
            out[k] = t.detach().view(ct.shape)
        return out

    # -- lookups -----------------------------------------------------------------------------
    def index(self, key: str) -> int:
        """The index of the block that holds weight ``key``."""
        return self._index[key]

    def of(self, key: str) -> StoredBlock:
        return self.blocks[self._index[key]]

    def views(self) -> list[BlockView]:
        """Every block, in module order, as a read-only view."""
        return [
            BlockView(
                b.index,
                b.name,
                b.tier,
                tuple(b.keys),
                b.layout.nbytes,
                tuple(b.dev_cts if b.dev_cts is not None else b.cts),
            )
            for b in self.blocks
        ]

    def compressed(self, key: str) -> CompressedTensor:
        """Weight ``key`` compressed, where its bytes are now (see Executor.compressed)."""
        blk = self.of(key)
        cts = blk.dev_cts if blk.dev_cts is not None else blk.cts
        return cts[blk.keys.index(key)]

    def device_buffers(self) -> list[torch.Tensor]:
        """Resident decoded weights and resident compressed planes."""
        out = []
        for b in self.blocks:
            out += list((b.resident or {}).values())
            out += [p for ct in b.dev_cts or [] for p in ct.planes.values()]
        return out

    # -- re-encoded weights --------------------------------------------------------------------
    def replace(self, key: str, ct: CompressedTensor, ready: object | None = None) -> None:
        """A re-encoded tensor (on the host) takes the place of the old one in its host block;
        ``ready``: an event after which its host planes are complete."""
        blk = self.of(key)
        if blk.tier not in (HOST,):
            raise RuntimeError(f"block {blk.name!r} ({blk.tier}) cannot take re-encoded weights")
        blk.cts[blk.keys.index(key)] = ct
        blk.locations = None
        if ready is not None:
            blk.pending.append(ready)
        if self.copies:
            self._dirty.add(blk.index)  # repacked into its pinned buffer before its next copy
        elif blk.pending:  # read as they are by the next decode: wait for them now
            blk.wait_pending()

    def repack_if_changed(self, b: int) -> bool:
        """Re-pack block ``b`` if re-encoded tensors changed it since its last fetch — in its own
        host region when it still fits, else into a new pinned buffer: whether it did."""
        if b not in self._dirty:
            return False
        blk = self.blocks[b]
        blk.wait_pending()  # the re-encoded planes have arrived on the host
        layout = PackedLayout.of(blk.cts)
        if blk.host_region is not None and layout.nbytes <= blk.host_region.numel():
            # The planes of the tensors not re-encoded are views of this very region, so they
            # are packed into plain memory first; the region may still be the source of the
            # block's last copy to the device: wait for that copy (long done by now: it ran in
            # the forward pass) before overwriting it.
            packed = pack(blk.cts, _cpu_bytes)
            if blk.last_copy is not None and not blk.last_copy.query():
                blk.last_copy.synchronize()
            buf = blk.host_region[: layout.nbytes]
            buf.copy_(packed)
        else:
            log.info("block %s grew past its host region: packed into a new buffer", blk.name)
            buf = pack(blk.cts, backend.empty_pinned)  # a new buffer: the old one is a source
            blk.host_region = buf
        blk.host_buf = buf
        blk.cts = bind(blk.cts, layout, blk.host_buf)
        blk.layout = layout
        self._dirty.discard(b)
        return True

    def close(self) -> None:
        for b in self.blocks:
            b.host_buf = b.dev_cts = b.resident = None
        self.disk_buffers.clear()
        self._arena = None  # unpinned and freed once no view of it is left
