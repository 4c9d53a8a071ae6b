"""The schedule loop: blocks are copied and decoded ahead of their use, on side streams.

Modules ask and notify; the executor decides all I/O:

    enter(block)   before a block runs: the compute stream waits for the block's "ready" event
                   (a miss fetches it now), then blocks j+1 .. j+prefetch of the recorded order are
                   requested: copy stream pinned host → staging, decode stream staging → slot
    weight(key)    a view of the decoded weight in its slot (or its resident tensor)
    exit(block)    after a block ran: its slot is released behind an event on the compute stream

The order is recorded during the first forward (module order predicts it until then). There is no
host synchronization and no empty_cache() in the loop; with the CPU backend the same calls run,
copies are skipped (the decoder reads host memory) and decoding happens at request time.
"""

from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import Executor as ThreadPool
from dataclasses import dataclass, field

import torch

from neuzip_offload import backend
from neuzip_offload.codec import decode_into, decompress_many
from neuzip_offload.compressed import CompressedTensor

from .plan import DEVICE, DEVICE_COMPRESSED, HOST, Plan
from .streams import Streams
from .tiers import Accountant, PackedLayout, SlotEntry, bind, pack, slot_layout

log = logging.getLogger(__name__)

LOG_LIMIT = 200_000


@dataclass
class BlockData:
    """What dispatch hands the executor for one block: its weights, compressed, in order."""

    name: str
    keys: list[str]
    cts: list[CompressedTensor]


@dataclass
class _Block:
    index: int
    name: str
    tier: str
    keys: list[str]
    entries: list[SlotEntry]
    layout: PackedLayout
    host_cts: list[CompressedTensor]  # the source of truth, on the host
    compressed_bytes: int
    decoded_bytes: int
    host_buf: torch.Tensor | None = None
    dev_cts: list[CompressedTensor] | None = None
    resident: dict[str, torch.Tensor] | None = None


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
class Stats:
    """Counters since dispatch (or the last ``reset``)."""

    forwards: int = 0
    copied_bytes: int = 0
    decoded_bytes: int = 0
    fetches: int = 0
    misses: int = 0
    decode_seconds: float = 0.0
    peak_held_bytes: int = 0
    _timings: list = field(default_factory=list, repr=False)

    def per_forward(self) -> dict[str, float]:
        f = max(self.forwards, 1)
        return {
            "copied_bytes": self.copied_bytes / f,
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
        self.pool = pool
        self.streams = Streams(device)
        self.events: collections.deque = collections.deque(maxlen=LOG_LIMIT)
        self.log_events = log_events
        self.stats = Stats()
        budget = plan.options.device_bytes - plan.options.reserve_bytes
        self.accountant = Accountant(budget)
        self.accountant.hold("uncompressed parameters", plan.options.resident_bytes)
        self._statuses: list[torch.Tensor] = []  # device-side decode statuses, read in settle()
        self._blocks: list[_Block] = []
        self._block_of: dict[str, int] = {}
        self._build(blocks)
        self.static_order = list(range(len(self._blocks)))
        self.order: list[int] | None = None
        self._recording: list[int] | None = None
        self._cursor = 0
        self._entered: dict[int, int] = {}
        self._slot_of: dict[int, int] = {}
        self.closed = False

    # -- setup -------------------------------------------------------------------------------
    def _device_alloc(self, purpose: str, nbytes: int) -> torch.Tensor:
        self.accountant.hold(purpose, nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _build(self, blocks: list[BlockData]) -> None:
        plan = self.plan
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
            )
            for k in data.keys:
                self._block_of[k] = i
            if tier == DEVICE:
                b.resident = {}
                for k, ct in zip(data.keys, data.cts, strict=True):
                    self.accountant.hold("resident decoded", ct.decoded_nbytes)
                    out = torch.empty(ct.numel, dtype=ct.dtype, device=self.device)
                    if self.copies:
                        # The compressed planes visit the device while it decodes them: at setup,
                        # when the reserve for activations is still unused.
                        limit = plan.options.device_bytes
                        with self.accountant.transient("setup copy", ct.nbytes, limit):
                            self._decode(ct.to(self.device), out)
                    else:
                        self._decode(ct, out)
                    b.resident[k] = out.view(ct.shape)
            elif tier == DEVICE_COMPRESSED and self.copies:
                buf = pack(data.cts, lambda n: self._device_alloc("resident compressed", n))
                b.dev_cts = bind(data.cts, layout, buf)
            elif tier == DEVICE_COMPRESSED:  # CPU backend: the same memory, counted as device
                self.accountant.hold("resident compressed", layout.nbytes)
                b.dev_cts = list(data.cts)
            else:
                b.host_buf = pack(data.cts, backend.empty_pinned)
                b.host_cts = bind(data.cts, layout, b.host_buf)
            self._blocks.append(b)
        if self.copies:
            self.streams.compute().synchronize()  # the setup copies are done

    # -- the forward protocol ------------------------------------------------------------------
    def begin_forward(self) -> None:
        self._cursor = 0
        if self.order is None and self._recording is None:
            self._recording = []

    def end_forward(self) -> None:
        self.stats.forwards += 1
        if self._recording is not None:
            self.order = self._recording
            self._recording = None
            self._note("order", tuple(self._blocks[i].name for i in self.order))

    def block_index(self, key: str) -> int:
        return self._block_of[key]

    def enter(self, b: int, predictable: bool = True) -> None:
        """Block ``b`` is about to run (``predictable=False``: a data-dependent use, such as an
        embedding lookup, which neither advances nor joins the recorded order)."""
        blk = self._blocks[b]
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
            if self.streams.cuda:
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
                if slot.in_use == 0 and self.streams.cuda:
                    slot.free = self.streams.event()
                    slot.free.record(self.streams.compute())
        self._note("exit", blk.name, self.accountant.total)

    def weight(self, key: str) -> torch.Tensor:
        b = self._block_of[key]
        blk = self._blocks[b]
        if blk.tier == DEVICE:
            return blk.resident[key]
        if b not in self._entered:
            raise RuntimeError(f"weight {key!r} was asked for outside its block {blk.name!r}")
        slot = self._slots[self._slot_of[b]]
        return blk.entries[blk.keys.index(key)].view(slot.buf)

    # -- order and prefetch ----------------------------------------------------------------------
    def _advance(self, b: int) -> None:
        if self._recording is not None:
            self._recording.append(b)
        order = self.order if self.order is not None else self.static_order
        try:
            pos = order.index(b, self._cursor)
        except ValueError:
            pos = order.index(b) if b in order else None
        if pos is not None:
            self._cursor = pos + 1

    def _window(self) -> list[int]:
        """The next ``prefetch`` blocks; once the order is known it wraps around, so the end of
        one forward prefetches the start of the next (generation runs forward after forward)."""
        if self.order is None:
            return self.static_order[self._cursor : self._cursor + self.prefetch]
        n = len(self.order)
        if n == 0:
            return []
        return [self.order[(self._cursor + i) % n] for i in range(min(self.prefetch, n))]

    def _prefetch_window(self) -> None:
        window = self._window()
        for b in window:
            if self._blocks[b].tier == DEVICE or b in self._slot_of:
                continue
            s = self._claim_slot(protect=window, required=False)
            if s is None:
                break
            self._fetch(b, s)

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

    # -- I/O -------------------------------------------------------------------------------------
    def _decode(self, ct: CompressedTensor, out: torch.Tensor) -> None:
        status = decode_into(ct, out.view(-1), pool=self.pool, workspace=self._workspace_for(ct))
        if status is not None:
            self._statuses.append(status)

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
        if blk.tier == HOST and self.copies:
            stage = self._staging[self._next_staging]
            self._next_staging = (self._next_staging + 1) % len(self._staging)
            with st.on(st.copy):
                if stage.free is not None:
                    st.copy.wait_event(stage.free)
                stage.buf[: blk.layout.nbytes].copy_(blk.host_buf, non_blocking=True)
                copied = st.event()
                copied.record(st.copy)
            self.stats.copied_bytes += blk.layout.nbytes
            source = bind(blk.host_cts, blk.layout, stage.buf)
            st.decode.wait_event(copied)
        else:
            source = blk.dev_cts if blk.tier == DEVICE_COMPRESSED else blk.host_cts
            stage = None
        with st.on(st.decode):
            if slot.free is not None:
                st.decode.wait_event(slot.free)
            t0 = time.perf_counter()
            start = st.event()
            start.record(st.decode)
            if st.cuda:
                for entry, ct in zip(blk.entries, source, strict=True):
                    self._decode(ct, entry.view(slot.buf))
            else:  # all frames of the block's tensors go to the pool at once
                decompress_many(source, [e.view(slot.buf) for e in blk.entries], pool=self.pool)
            slot.ready = st.event()
            slot.ready.record(st.decode)
            if stage is not None:
                stage.free = st.event()
                stage.free.record(st.decode)
        if st.cuda:
            self.stats._timings.append((start, slot.ready))
        else:
            self.stats.decode_seconds += time.perf_counter() - t0

    # -- bookkeeping -----------------------------------------------------------------------------
    def _note(self, kind: str, *args) -> None:
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, self.accountant.peak)
        if self.log_events:
            self.events.append((kind, *args))

    def settle(self) -> None:
        """Read device-side timings and decode statuses (synchronizes the side streams)."""
        if not self.streams.cuda:
            return
        self.streams.decode.synchronize()
        for start, end in self.stats._timings:
            self.stats.decode_seconds += start.elapsed_time(end) / 1e3
        self.stats._timings.clear()
        bad = [s for s in self._statuses if not bool(s.all())]
        self._statuses.clear()
        if bad:
            from neuzip_offload.compressed import DamagedDataError

            raise DamagedDataError(f"{len(bad)} decode(s) on {self.device} did not end cleanly")

    def close(self) -> None:
        if self.closed:
            return
        self.streams.close()
        self._slots.clear()
        self._staging.clear()
        self._workspace = None
        for b in self._blocks:
            b.host_buf = b.dev_cts = b.resident = None
        self.closed = True
