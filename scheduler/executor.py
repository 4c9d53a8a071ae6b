"""The schedule loop: blocks are read, copied and decoded ahead of their use, on side streams.

Modules ask and notify; the executor decides all I/O:

    enter(block)   before a block runs: the compute stream waits for the block's "ready" event
                   (a miss fetches it now); then blocks j+1 .. j+prefetch of the recorded order
                   are requested — copy stream: pinned host → staging, decode stream: staging →
                   slot — and disk blocks up to read_ahead further are read by a background
                   reader into pinned host staging, so disk → host → device is one pipeline
    weight(key)    a view of the decoded weight in its slot (or its resident tensor)
    exit(block)    after a block ran: its slot is released behind an event on the compute stream

The order is recorded during the first forward (module order predicts it until then). All CUDA
work is issued from the calling thread; the reader thread only reads files and checks CRCs. No
device synchronization and no empty_cache() in the loop. With the CPU backend the same calls
run: copies are skipped (the decoder reads host memory) and decoding happens at request time.
"""

from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import Executor as ThreadPool
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from neuzip_offload import backend
from neuzip_offload.codec import decode_into, decompress_many
from neuzip_offload.compressed import CompressedTensor
from neuzip_offload.storage import PlaneLocation

from .plan import DEVICE, DEVICE_COMPRESSED, DISK, HOST, Plan
from .streams import Streams
from .tiers import (
    Accountant,
    BudgetExceededError,
    HostArena,
    PackedLayout,
    SlotEntry,
    bind,
    pack,
    read_packed,
    slot_layout,
)

log = logging.getLogger(__name__)

LOG_LIMIT = 200_000


@dataclass
class BlockData:
    """What dispatch hands the executor for one block: its weights, compressed, in order.

    With ``locations`` the bytes are in files (a checkpoint) and the tensors' planes are
    placeholders of the right sizes (e.g. on the meta device).
    """

    name: str
    keys: list[str]
    cts: list[CompressedTensor]
    locations: list[dict[str, PlaneLocation]] | None = None


@dataclass
class _Block:
    index: int
    name: str
    tier: str
    keys: list[str]
    entries: list[SlotEntry]
    layout: PackedLayout
    cts: list[CompressedTensor]  # bound to host memory, or placeholders when on disk
    compressed_bytes: int
    decoded_bytes: int
    locations: list[dict[str, PlaneLocation]] | None = None
    host_buf: torch.Tensor | None = None
    host_region: torch.Tensor | None = None  # where host_buf lies (re-encoded blocks may grow)
    last_copy: object | None = None  # copy-stream event of the last copy out of host_buf
    pending: list = field(default_factory=list)  # events of copies filling re-encoded planes
    dev_cts: list[CompressedTensor] | None = None
    resident: dict[str, torch.Tensor] | None = None


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
class _Slot:
    buf: torch.Tensor
    block: int | None = None
    in_use: int = 0
    ready: object | None = None
    free: object | None = None


@dataclass
class _Staging:
    buf: torch.Tensor
    free: object | None = None


@dataclass
class _Read:
    """A pinned host staging buffer of the disk reader, and the block read (or being read)."""

    buf: torch.Tensor
    block: int | None = None
    future: Future | None = None
    free: object | None = None  # copy-stream event after which the buffer may be overwritten


def _cpu_bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


@dataclass
class Stats:
    """Counters since dispatch."""

    forwards: int = 0
    copied_bytes: int = 0
    read_bytes: int = 0
    decoded_bytes: int = 0
    fetches: int = 0
    misses: int = 0
    decode_seconds: float = 0.0
    peak_held_bytes: int = 0

    def per_forward(self) -> dict[str, float]:
        f = max(self.forwards, 1)
        return {
            "copied_bytes": self.copied_bytes / f,
            "read_bytes": self.read_bytes / f,
            "decoded_bytes": self.decoded_bytes / f,
            "fetches": self.fetches / f,
            "misses": self.misses / f,
            "decode_seconds": self.decode_seconds / f,
        }


class Executor:
    def __init__(
        self,
        plan: Plan,
        blocks: list[BlockData],
        device: torch.device,
        *,
        pool: ThreadPool | None = None,
        log_events: bool = True,
    ):
        if len(blocks) != len(plan.blocks):
            raise ValueError("the plan and the blocks disagree")
        self.plan = plan
        self.device = device
        self.prefetch = plan.options.prefetch
        self.copies = plan.options.copies  # False on the CPU backend (tests may force True)
        o = plan.options
        self.read_ahead = o.prefetch if o.read_ahead is None else o.read_ahead
        self.pool = pool
        self.streams = Streams(device)
        self.events: collections.deque = collections.deque(maxlen=LOG_LIMIT)
        self.log_events = log_events
        self.stats = Stats()
        self.accountant = Accountant(o.device_bytes - o.reserve_bytes)
        self.accountant.hold("uncompressed parameters", o.resident_bytes)
        # Decode damage: bad rANS chunks per block, counted on the device as decodes finish and
        # read at the end of each forward and backward (one synchronization, none per block).
        self._damage: torch.Tensor | None = None
        self._damage_host: torch.Tensor | None = None
        # (start, end) timing events of device decodes not read yet: drained as they complete,
        # so the queue holds only decodes in flight
        self._timings: collections.deque = collections.deque()
        # Device decoders run tensor by tensor and report damage per chunk (see _decode); the
        # CPU backend decodes a block's tensors in one batch. (Tests turn the former on under
        # Triton's interpreter.)
        self.per_tensor_decode = device.type == "cuda"
        self._blocks: list[_Block] = []
        self._block_of: dict[str, int] = {}
        self._reader: ThreadPoolExecutor | None = None
        self._reads: list[_Read] = []
        self._read_of: dict[int, int] = {}
        self._build(blocks)
        self.static_order = list(range(len(self._blocks)))
        # orders recorded per phase; backward enters blocks as its saved weights are unpacked
        self.orders: dict[str, list[int] | None] = {"forward": None, "backward": None}
        self._phase = "forward"
        self._recording: list[int] | None = None
        self._cursor = 0
        self._entered: dict[int, int] = {}
        self._slot_of: dict[int, int] = {}
        self._in_backward = False
        self._backward_held: set[int] = set()
        self.on_backward_end: list = []  # callbacks, e.g. the trainer's end of step
        self._dirty: set[int] = set()  # host blocks whose tensors were re-encoded
        self.closed = False

    # -- setup -------------------------------------------------------------------------------
    def _device_alloc(self, purpose: str, nbytes: int) -> torch.Tensor:
        self.accountant.hold(purpose, nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    @staticmethod
    def _host_copy(
        data: BlockData, layout: PackedLayout, alloc
    ) -> tuple[torch.Tensor, list[CompressedTensor]]:
        """The block's tensors in one host buffer from ``alloc``: packed, or read from disk."""
        if data.locations is None:
            buf = pack(data.cts, alloc)
            return buf, bind(data.cts, layout, buf)
        buf = alloc(layout.nbytes)
        return buf, read_packed(data.cts, layout, data.locations, buf)

    def _build(self, blocks: list[BlockData]) -> None:
        plan = self.plan
        if self.device.type == "cuda":
            n = len(blocks)
            self._damage = self._device_alloc("decode status", 4 * n).view(torch.int32).zero_()
            self._damage_host = backend.empty_pinned(4 * n).view(torch.int32)
        self._slots = [
            _Slot(self._device_alloc("slots", plan.slot_bytes)) for _ in range(plan.n_slots)
        ]
        self._staging = [
            _Staging(self._device_alloc("staging", plan.staging_bytes))
            for _ in range(plan.n_staging if self.copies else 0)
        ]
        self._next_staging = 0
        self._workspace = (
            self._device_alloc("decode workspace", plan.workspace_bytes)
            if plan.workspace_bytes
            else None
        )
        # pinned host memory, exactly what the plan counts: the host tier and the disk reader's
        # staging (plus 1/64 of each host block for re-encoded growth when training)
        grow = 0 if plan.options.device_compressed else 64
        hosted = [
            PackedLayout.of(d.cts).nbytes
            for d, t in zip(blocks, plan.tiers, strict=True)
            if t == HOST and (self.copies or d.locations is not None)
        ]
        regions = [n + (n // grow if grow else 0) for n in hosted]
        self._arena = HostArena(
            HostArena.size(regions + [plan.disk_staging_bytes] * plan.n_disk_staging)
        )
        if plan.n_disk_staging:
            self._reads = [
                _Read(self._arena.take(plan.disk_staging_bytes)) for _ in range(plan.n_disk_staging)
            ]
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuzip-disk")
        for i, (data, spec, tier) in enumerate(zip(blocks, plan.blocks, plan.tiers, strict=True)):
            entries, _ = slot_layout(data.cts, data.keys)
            layout = PackedLayout.of(data.cts)
            b = _Block(
                i,
                data.name,
                tier,
                list(data.keys),
                entries,
                layout,
                list(data.cts),
                spec.compressed_bytes,
                spec.decoded_bytes,
                data.locations,
            )
            for k in data.keys:
                self._block_of[k] = i
            if tier == DEVICE:
                b.resident = self._decode_resident(data, layout)
                b.cts = [ct.placeholder() for ct in data.cts]  # decoded now: keep no bytes
            elif tier == DEVICE_COMPRESSED and self.copies:
                _, host = self._host_copy(data, layout, _cpu_bytes)
                buf = pack(host, lambda n: self._device_alloc("resident compressed", n))
                b.dev_cts = bind(data.cts, layout, buf)
            elif tier == DEVICE_COMPRESSED:  # CPU backend: the same memory, counted as device
                self.accountant.hold("resident compressed", layout.nbytes)
                _, b.dev_cts = self._host_copy(data, layout, backend.empty_pinned)
            elif tier == HOST and (self.copies or data.locations is not None):
                spare = layout.nbytes // grow if grow else 0
                b.host_region = self._arena.take(layout.nbytes + spare)
                b.host_buf, b.cts = self._host_copy(data, layout, lambda n, r=b.host_region: r[:n])
            # (HOST on the CPU backend: the tensors as they are — nothing is copied from them)
            self._blocks.append(b)
        if self.copies:
            self.streams.compute().synchronize()  # the setup copies are done
        self._check_damage()  # resident blocks decoded at setup

    def _decode_resident(self, data: BlockData, layout: PackedLayout) -> dict[str, torch.Tensor]:
        cts = data.cts
        if data.locations is not None:
            _, cts = self._host_copy(data, layout, _cpu_bytes)
        out = {}
        for k, ct in zip(data.keys, cts, strict=True):
            self.accountant.hold("resident decoded", ct.decoded_nbytes)
            t = torch.empty(ct.numel, dtype=ct.dtype, device=self.device)
            if self.copies:
                # The compressed planes visit the device while they decode: at setup, when the
                # reserve for activations is still unused.
                limit = self.plan.options.device_bytes
                with self.accountant.transient("setup copy", ct.nbytes, limit):
                    self._decode(ct.to(self.device), t, len(self._blocks))
            else:
                self._decode(ct, t, len(self._blocks))
            out[k] = t.view(ct.shape)
        return out

    # -- the forward and backward protocol -------------------------------------------------------
    @property
    def order(self) -> list[int] | None:
        """The recorded forward order (None until the first forward has run)."""
        return self.orders["forward"]

    def _begin(self, phase: str) -> None:
        self._phase = phase
        self._cursor = 0
        self._recording = [] if self.orders[phase] is None else None

    def _end(self, phase: str) -> None:
        if self._recording is not None and self._phase == phase:
            self.orders[phase] = self._recording
            self._note(f"{phase} order", tuple(self._blocks[i].name for i in self._recording))
        self._recording = None

    def begin_forward(self) -> None:
        self._begin("forward")

    def end_forward(self) -> None:
        self.stats.forwards += 1
        self._end("forward")
        self._check_damage()

    def backward_weight(self, key: str) -> torch.Tensor:
        """A weight for backward (the graph kept only a marker): its block is entered, earlier
        backward blocks are released — their ops have been issued by now — and the end of the
        backward pass releases the rest."""
        b = self._block_of[key]
        if not self._in_backward:
            self._in_backward = True
            self._begin("backward")
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        if b not in self._backward_held:
            for held in list(self._backward_held):
                self._backward_held.discard(held)
                self.exit(held)
            self.enter(b)
            self._backward_held.add(b)
        return self.weight(key)

    def _end_backward(self) -> None:
        for held in list(self._backward_held):
            self.exit(held)
        self._backward_held.clear()
        self._in_backward = False
        self._end("backward")
        self._phase = "forward"
        for fn in self.on_backward_end:
            fn()
        self._check_damage()

    def is_resident(self, b: int) -> bool:
        return self._blocks[b].tier == DEVICE

    def replace(self, key: str, ct: CompressedTensor, ready: object | None = None) -> None:
        """A re-encoded tensor (on the host) takes the place of the old one in its block.

        ``ready``: an event after which its host planes are complete (a device → host copy in
        flight); the block's repacking waits for it before reading them."""
        b = self._block_of[key]
        blk = self._blocks[b]
        if blk.tier not in (HOST,):
            raise RuntimeError(f"block {blk.name!r} ({blk.tier}) cannot take re-encoded weights")
        blk.cts[blk.keys.index(key)] = ct
        blk.locations = None
        if ready is not None:
            blk.pending.append(ready)
        if self.copies:
            self._dirty.add(b)  # repacked into its pinned buffer before its next copy
        elif blk.pending:  # read as they are by the next decode: wait for them now
            self._wait_pending(blk)

    @staticmethod
    def _wait_pending(blk: _Block) -> None:
        """Wait for the copies that fill the block's re-encoded host planes (usually done)."""
        for ev in blk.pending:
            ev.synchronize()  # returns at once for a finished copy
        blk.pending.clear()

    def scratch(self, purpose: str, nbytes: int):
        """Account device work of ``nbytes`` that lasts a moment (training's re-encoding of a
        weight) against the plan's scratch bytes: a context manager."""
        if nbytes > self.plan.options.scratch_bytes:
            raise BudgetExceededError(
                f"{purpose}: {nbytes} bytes of scratch, the plan kept "
                f"{self.plan.options.scratch_bytes} (a planner bug)"
            )
        return self.accountant.transient(purpose, nbytes)

    # -- introspection (a read-only view for tests, benchmarks and tools) ----------------------
    def blocks(self) -> list[BlockView]:
        """Every block, in module order."""
        return [
            BlockView(
                b.index,
                b.name,
                b.tier,
                tuple(b.keys),
                b.layout.nbytes,
                tuple(b.dev_cts if b.dev_cts is not None else b.cts),
            )
            for b in self._blocks
        ]

    def compressed(self, key: str) -> CompressedTensor:
        """Weight ``key`` compressed, where its bytes are now: on the device (device-compressed),
        in host memory (host), or a placeholder (disk, or resident decoded). Valid until
        close(); host-tier planes stay valid after it (they are views the caller keeps alive)."""
        blk = self._blocks[self._block_of[key]]
        cts = blk.dev_cts if blk.dev_cts is not None else blk.cts
        return cts[blk.keys.index(key)]

    def tier_of(self, key: str) -> str:
        """The tier of the block that holds weight ``key``."""
        return self._blocks[self._block_of[key]].tier

    def device_buffers(self) -> list[torch.Tensor]:
        """The device memory this executor allocated: slots, staging, the decode workspace,
        resident decoded weights and resident compressed planes (for checks that walk real
        allocations instead of trusting the accountant)."""
        out = [s.buf for s in self._slots] + [s.buf for s in self._staging]
        if self._workspace is not None:
            out.append(self._workspace)
        for b in self._blocks:
            out += list((b.resident or {}).values())
            out += [p for ct in b.dev_cts or [] for p in ct.planes.values()]
        return out

    def pending_timings(self) -> int:
        """Device decodes whose duration has not been read yet (only those in flight)."""
        return len(self._timings)

    def damage_counts(self) -> torch.Tensor | None:
        """Per block, damaged chunks met by device decodes since the last check (a copy; None
        while no device decoder has run)."""
        return None if self._damage is None else self._damage.clone()

    def block_index(self, key: str) -> int:
        return self._block_of[key]

    def enter(self, b: int, predictable: bool = True) -> None:
        """Block ``b`` is about to run (``predictable=False``: a data-dependent use, such as an
        embedding lookup, which neither advances nor joins the recorded order)."""
        blk = self._blocks[b]
        self.streams.entered(blk.name)  # checking mode: host syncs from here count for blk
        if predictable:
            self._advance(b)
        held = self._entered.get(b, 0)
        self._entered[b] = held + 1
        if blk.tier != DEVICE and held == 0:
            s = self._slot_of.get(b)
            if s is None:
                self.stats.misses += 1
                self._note("miss", blk.name)
                s = self._claim_slot(protect=self._window())
                self._fetch(b, s)
            slot = self._slots[s]
            slot.in_use += 1
            if self.streams.ordered:
                self.streams.compute().wait_event(slot.ready)
        self._note("enter", blk.name, self.accountant.total)
        self._prefetch_window()

    def exit(self, b: int) -> None:
        blk = self._blocks[b]
        self._entered[b] -= 1
        if self._entered[b] == 0:
            del self._entered[b]
            if blk.tier != DEVICE:
                slot = self._slots[self._slot_of[b]]
                slot.in_use -= 1
                if slot.in_use == 0 and self.streams.ordered:
                    slot.free = self.streams.event("slot.free")
                    slot.free.record(self.streams.compute())
        self._note("exit", blk.name, self.accountant.total)
        self.streams.exited(blk.name)

    def weight(self, key: str) -> torch.Tensor:
        b = self._block_of[key]
        blk = self._blocks[b]
        if blk.tier == DEVICE:
            return blk.resident[key]
        if b not in self._entered:
            raise RuntimeError(f"weight {key!r} was asked for outside its block {blk.name!r}")
        slot = self._slots[self._slot_of[b]]
        w = blk.entries[blk.keys.index(key)].view(slot.buf)
        self.streams.read(w, self.streams.compute(), "slot")  # checking mode: compute reads it
        return w

    # -- order and prefetch ----------------------------------------------------------------------
    def _predicted(self) -> list[int]:
        """This phase's order: recorded, or predicted (module order; backward: reversed)."""
        if self.orders[self._phase] is not None:
            return self.orders[self._phase]
        forward = self.orders["forward"] or self.static_order
        return forward[::-1] if self._phase == "backward" else forward

    def _advance(self, b: int) -> None:
        if self._recording is not None:
            self._recording.append(b)
        order = self._predicted()
        try:
            pos = order.index(b, self._cursor)
        except ValueError:
            pos = order.index(b) if b in order else None
        if pos is not None:
            self._cursor = pos + 1

    def _window(self, extra: int = 0) -> list[int]:
        """The next ``prefetch`` (+ ``extra``) blocks; once the order is known it wraps around,
        so the end of one forward prefetches the start of the next."""
        count = self.prefetch + extra
        order = self._predicted()
        if self.orders[self._phase] is None or not order:
            return order[self._cursor : self._cursor + count]
        n = len(order)
        return [order[(self._cursor + i) % n] for i in range(min(count, n))]

    def _prefetch_window(self) -> None:
        window = self._window()
        for b in window:
            blk = self._blocks[b]
            if blk.tier == DEVICE or b in self._slot_of:
                continue
            if blk.tier == DISK:
                r = self._read_of.get(b)
                if r is None or not self._reads[r].future.done():
                    continue  # not read yet: its copy and decode wait for a later step
            s = self._claim_slot(protect=window, required=False)
            if s is None:
                break
            self._fetch(b, s)
        if self._reads:
            ahead = self._window(self.read_ahead)
            unread = [
                b
                for b in ahead
                if self._blocks[b].tier == DISK
                and b not in self._read_of
                and b not in self._slot_of
            ]
            for b in unread:
                if not self._start_read(b):
                    break

    def _claim_slot(self, protect: list[int], required: bool = True) -> int | None:
        """A slot whose block is not running nor about to run (its 'free' event guards reuse)."""
        keep = set(protect) | set(self._entered)
        free = [i for i, s in enumerate(self._slots) if s.in_use == 0 and s.block not in keep]
        if not free:
            free = [i for i, s in enumerate(self._slots) if s.in_use == 0] if required else []
        if not free:
            if required:
                raise RuntimeError("no free slot: more blocks are running at once than slots")
            return None
        s = next((i for i in free if self._slots[i].block is None), free[0])
        old = self._slots[s].block
        if old is not None:
            del self._slot_of[old]
        return s

    # -- disk ------------------------------------------------------------------------------------
    def _start_read(self, b: int) -> bool:
        """Hand block ``b`` to the background reader, if a staging buffer is free."""
        free = [i for i, r in enumerate(self._reads) if r.block is None]
        if not free:
            return False
        i = free[0]
        r = self._reads[i]
        blk = self._blocks[b]
        buf = r.buf[: blk.layout.nbytes]
        wait = r.free

        def read() -> list[CompressedTensor]:
            if wait is not None:
                wait.synchronize()  # the last copy out of this buffer has finished
            self.streams.write(buf, None, "disk-read buffer")  # checking mode: this thread writes
            return read_packed(blk.cts, blk.layout, blk.locations, buf)

        r.block, r.future, r.free = b, self._reader.submit(read), None
        self._read_of[b] = i
        self.stats.read_bytes += blk.layout.nbytes
        self._note("read", blk.name)
        return True

    def _take_read(self, b: int) -> tuple[torch.Tensor, list[CompressedTensor], _Read]:
        """The block in host staging: (buffer, tensors bound to it, its reader slot)."""
        if b not in self._read_of and not self._start_read(b):
            self._evict_read()
            self._start_read(b)
        r = self._reads[self._read_of.pop(b)]
        cts = r.future.result()  # a host wait, for the file read only
        self.streams.host_joined(r.buf)  # checking mode: the reader's writes come before ours
        r.block, r.future = None, None
        return r.buf[: self._blocks[b].layout.nbytes], cts, r

    def _evict_read(self) -> None:
        """Drop a read-ahead that was not used yet (a miss needs its buffer)."""
        i = next(i for i, r in enumerate(self._reads) if r.block is not None)
        r = self._reads[i]
        r.future.result()
        del self._read_of[r.block]
        r.block, r.future = None, None

    # -- I/O -------------------------------------------------------------------------------------
    def _decode(self, ct: CompressedTensor, out: torch.Tensor, b: int) -> None:
        """Decode into ``out`` on the current stream. A device decode reports per chunk (1 = ok);
        its bad chunks are added to block ``b``'s damage count there and then, so no status
        tensor outlives its decode (their memory returns to the allocator on this stream)."""
        status = decode_into(ct, out.view(-1), pool=self.pool, workspace=self._workspace_for(ct))
        if status is not None:
            if self._damage is None:  # a device decoder on the CPU (tests force Triton there)
                self._damage = torch.zeros(len(self.plan.blocks), dtype=torch.int32)
            self._damage[b].add_((status == 0).sum(dtype=torch.int32))

    def _workspace_for(self, ct: CompressedTensor) -> torch.Tensor | None:
        """The decode workspace, if it is large enough (else the decoder makes its own)."""
        ws = self._workspace
        if ws is None:
            return None
        if ct.device.type == "cuda":
            need = 4 * (ct.header.n_chunks << ct.header.prob_bits)
            return ws[:need].view(torch.int32) if ct.codec == "ans" and need <= ws.numel() else None
        return ws[: ct.numel] if ct.numel <= ws.numel() else None

    def _fetch(self, b: int, s: int) -> None:
        blk = self._blocks[b]
        slot = self._slots[s]
        slot.block = b
        self._slot_of[b] = s
        self.stats.fetches += 1
        self.stats.decoded_bytes += blk.decoded_bytes
        self._note("request", blk.name)
        st = self.streams
        read = None
        if blk.tier == DISK:
            host, host_cts, read = self._take_read(b)
        else:
            if b in self._dirty:
                self._repack(blk)
            host = blk.host_buf
            host_cts = blk.dev_cts if blk.tier == DEVICE_COMPRESSED else blk.cts
        stage = None
        if blk.tier in (HOST, DISK) and self.copies:
            stage = self._staging[self._next_staging]
            self._next_staging = (self._next_staging + 1) % len(self._staging)
            with st.on(st.copy):
                if stage.free is not None:
                    st.copy.wait_event(stage.free)
                st.read(host, st.copy, "pinned host block" if read is None else "disk-read buffer")
                st.write(stage.buf[: blk.layout.nbytes], st.copy, "staging buffer")
                stage.buf[: blk.layout.nbytes].copy_(host, non_blocking=True)
                copied = st.event("copied")
                copied.record(st.copy)
            if read is not None:
                read.free = copied  # the reader may refill this host buffer once copied
            else:
                blk.last_copy = copied  # _repack overwrites host_buf only after this
            self.stats.copied_bytes += blk.layout.nbytes
            source = bind(host_cts, blk.layout, stage.buf)
            st.decode.wait_event(copied)
        else:
            source = host_cts
        with st.on(st.decode):
            if slot.free is not None:
                st.decode.wait_event(slot.free)
            t0 = time.perf_counter()
            start = st.event("decode start", timing=True)
            start.record(st.decode)
            if stage is not None:
                st.read(stage.buf[: blk.layout.nbytes], st.decode, "staging buffer")
            st.write(slot.buf, st.decode, "slot")  # checking mode: the decode writes the slot
            if self.per_tensor_decode:
                for entry, ct in zip(blk.entries, source, strict=True):
                    self._decode(ct, entry.view(slot.buf), b)
            else:  # all frames of the block's tensors go to the pool at once; no checksum
                # here: host and disk blocks were checked when they were made or read
                outs = [e.view(slot.buf) for e in blk.entries]
                decompress_many(source, outs, pool=self.pool, verify=False)
            slot.ready = st.event("slot.ready", timing=True)
            slot.ready.record(st.decode)
            if stage is not None:
                stage.free = st.event("stage.free")
                stage.free.record(st.decode)
        if st.cuda:
            self._timings.append((start, slot.ready))
            self._read_timings(wait=False)
        else:
            self.stats.decode_seconds += time.perf_counter() - t0

    def _repack(self, blk: _Block) -> None:
        """Re-encoded tensors changed the block's sizes: pack it again — in its own host region
        when it still fits, else into a new pinned buffer — and grow the staging buffers if
        they no longer hold it."""
        self._wait_pending(blk)  # the re-encoded planes have arrived on the host
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
        for stage in self._staging:
            if stage.buf.numel() < layout.nbytes:
                if stage.free is not None:
                    stage.free.synchronize()
                self.accountant.release("staging", stage.buf.numel())
                stage.buf = self._device_alloc("staging", layout.nbytes + layout.nbytes // 16)
                stage.free = None
        self._dirty.discard(blk.index)

    # -- bookkeeping -----------------------------------------------------------------------------
    def _note(self, kind: str, *args) -> None:
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, self.accountant.peak)
        if self.log_events:
            self.events.append((kind, *args))

    def _read_timings(self, wait: bool) -> None:
        """Add the durations of finished device decodes to the stats (``wait``: all of them,
        after synchronizing the decode stream; else only those done, without waiting)."""
        if wait and self._timings:
            self.streams.decode.synchronize()
        while self._timings and (wait or self._timings[0][1].query()):
            start, end = self._timings.popleft()
            self.stats.decode_seconds += start.elapsed_time(end) / 1e3

    def _check_damage(self) -> None:
        """Raise DamagedDataError if a device decode since the last check met a damaged chunk.

        On CUDA the counts are copied to pinned memory behind the decodes issued so far and
        that copy is waited for: the one synchronization per forward (and per backward) that
        turns device-side damage into an error before the results are used."""
        if self._damage is None:
            return
        if self.streams.cuda:
            st = self.streams
            with st.on(st.decode):
                self._damage_host.copy_(self._damage, non_blocking=True)
                done = st.event()
                done.record(st.decode)
            done.synchronize()  # the damage counts have arrived in host memory
            counts = self._damage_host
        else:
            counts = self._damage
        bad = counts.nonzero().flatten().tolist()  # host memory: no device synchronization
        if not bad:
            return
        with self.streams.on(self.streams.decode):
            self._damage.zero_()
        names = [self.plan.blocks[b].name for b in bad]
        from neuzip_offload.compressed import DamagedDataError

        raise DamagedDataError(
            f"decoding on {self.device} met damaged data in block(s) {', '.join(names)}: "
            "a rANS chunk did not end in its final state"
        )

    def settle(self) -> None:
        """Read device-side timings and check decode damage (synchronizes the decode stream)."""
        if not self.streams.cuda and self._damage is None:
            return
        self._read_timings(wait=True)
        self._check_damage()

    def close(self) -> None:
        if self.closed:
            return
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        self.streams.close()
        self._slots.clear()
        self._staging.clear()
        self._reads.clear()
        self._workspace = None
        for b in self._blocks:
            b.host_buf = b.dev_cts = b.resident = None
        self._arena = None  # unpinned and freed once no view of it is left
        self.closed = True
