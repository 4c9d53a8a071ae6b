"""The schedule loop: blocks are read, copied and decoded ahead of their use, on side streams.

Modules ask and notify; the executor decides all I/O:

    enter(block)   before a block runs: the compute stream waits for the block's "ready" event
                   (a miss fetches it now); then blocks j+1 .. j+prefetch of the recorded order
                   are requested — copy stream: pinned host → staging, decode stream: staging →
                   slot — and disk blocks up to read_ahead further are read by a background
                   reader into pinned host staging, so disk → host → device is one pipeline
    weight(key)    a view of the decoded weight in its slot (or its resident tensor)
    exit(block)    after a block ran: its slot is released behind an event on the compute stream

It composes the parts of the data path below it: the BlockStore (store.py: each block in its
tier), the OrderTracker (order.py: recorded orders and the prefetch window), the DiskReader
(reader.py), the Decoder (decoder.py) and the Accountant (accounting.py); it owns the slots,
the copy staging ring and the stats. The order is recorded during the first forward (module
order predicts it until then). All CUDA work is issued from the calling thread; the reader
thread only reads files and checks CRCs. No device synchronization and no empty_cache() in the
loop. With the CPU backend the same calls run: copies are skipped (the decoder reads host
memory) and decoding happens at request time.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor as ThreadPool
from dataclasses import dataclass

import torch

from neuzip_offload.compressed import CompressedTensor

from .accounting import Accountant, BudgetExceededError
from .decoder import Decoder
from .experts import SHARED, Experts
from .layout import bind
from .order import OrderTracker
from .plan import DEVICE, DISK, HOST, Plan
from .reader import DiskReader
from .store import BlockData, BlockStore, BlockView
from .streams import Streams

LOG_LIMIT = 200_000


@dataclass
class _Slot:
    """A device buffer holding one decoded block, and the events that guard it."""

    buf: torch.Tensor
    block: int | None = None
    group: str | None = None  # an expert pool's slot: the experts module it serves
    last_use: int = 0  # when its block was last entered or exited (LRU among experts)
    in_use: int = 0
    ready: object | None = None  # decode stream: the block's weights are in the buffer
    free: object | None = None  # compute stream: the last block to use it is done


@dataclass
class _Staging:
    """A device buffer a host block is copied into before its decode (with copies only)."""

    buf: torch.Tensor
    free: object | None = None  # decode stream: the decode that read it is done


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


def queue_at_end_of_backward(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the backward pass now running ends: the scheduler's one use of torch's
    autograd engine (a private API that backward hooks offer no public equivalent of)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class Executor:
    """The schedule loop over one plan's blocks on one device (see the module docstring).

    Built once per dispatch: allocates the slots, the copy staging ring and the decoder's
    workspace under the Accountant, puts every block in its tier (BlockStore), and starts the
    disk reader when the plan has a disk tier. ``close()`` releases it all."""

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
        o = plan.options
        self.prefetch = o.prefetch
        self.copies = o.copies  # False on the CPU backend (tests may force True)
        self.read_ahead = o.prefetch if o.read_ahead is None else o.read_ahead
        self.pool = pool
        self.streams = Streams(device)
        self.events: collections.deque = collections.deque(maxlen=LOG_LIMIT)
        self.log_events = log_events
        self.stats = Stats()
        self.accountant = Accountant(o.device_bytes - o.reserve_bytes)
        self.accountant.hold("uncompressed parameters", o.resident_bytes)
        alloc = self.accountant.allocate
        self._slots = [_Slot(alloc("slots", plan.slot_bytes, device)) for _ in range(plan.n_slots)]
        # experts: a pool of decoded slots per experts module and working slots all share
        # (LRU over both); none when the plan keeps every expert resident decoded
        self.experts = Experts(plan)
        for g, n in self.experts.pools(plan):
            self._slots += [
                _Slot(alloc("expert slots", plan.expert_slot_bytes, device), group=g)
                for _ in range(n)
            ]
        self._uses = 0  # a clock for the LRU
        self._staging = [
            _Staging(alloc("staging", plan.staging_bytes, device))
            for _ in range(plan.n_staging if self.copies else 0)
        ]
        self._next_staging = 0
        names = [b.name for b in plan.blocks]
        self.decoder = Decoder(names, self.streams, self.accountant, plan.workspace_bytes, pool)
        self.store = BlockStore(plan, blocks, self.accountant, self.decoder, self.copies)
        self.reader = (
            DiskReader(self.store.disk_buffers, self.streams) if plan.n_disk_staging else None
        )
        if self.copies:
            self.streams.compute().synchronize()  # the setup copies are done
        self.decoder.check_damage()  # resident blocks decoded at setup
        routed = {b for b, r in enumerate(self.experts.routed) if r}
        self.tracker = OrderTracker(len(self.store.blocks), routed)
        self._entered: dict[int, int] = {}
        self._slot_of: dict[int, int] = {}
        self._in_backward = False
        self._backward_held: set[int] = set()
        self.on_backward_end: list = []  # callbacks, e.g. the trainer's end of step
        self.on_backward_abandoned: list = []  # callbacks: a backward failed before its end
        self.on_pass_begin: list = []  # callbacks: a forward or a backward begins
        # One pass at a time: a forward holds this from begin_forward to end_forward, so that
        # forwards from several threads run one after another (the slots, the order and the
        # cursor are this executor's alone). Reentrant: a model may call itself.
        self._lock = threading.RLock()
        self._forward_thread: int | None = None
        self._forward_depth = 0
        self._versions: dict[str, int] = {}  # per key: updates since dispatch (training)
        self.closed = False

    # -- the forward and backward protocol -------------------------------------------------------
    @property
    def orders(self) -> dict[str, list[int] | None]:
        """The recorded order of each phase (None until one has run)."""
        return self.tracker.orders

    @property
    def order(self) -> list[int] | None:
        """The recorded forward order (None until the first forward has run)."""
        return self.tracker.orders["forward"]

    def _end(self, phase: str) -> None:
        recorded = self.tracker.end(phase)
        if recorded is not None:
            self._note(f"{phase} order", tuple(self.store.blocks[i].name for i in recorded))

    def begin_forward(self) -> None:
        """A forward of the model starts (waits while another thread's forward runs)."""
        self._lock.acquire()
        self._forward_depth += 1
        if self._forward_depth > 1:
            return  # the model called within its own forward: one pass
        self._forward_thread = threading.get_ident()
        if self._in_backward:
            # A backward that raised never reached its end (torch runs no end-of-backward
            # callback after an error): release what it held before this forward runs.
            self.abandon_backward()
        self.tracker.begin("forward")
        for fn in self.on_pass_begin:
            fn()

    def end_forward(self, failed: bool = False) -> None:
        """The forward begun last ended (``failed``: by an exception; it records no order)."""
        try:
            if self._forward_depth == 1:
                self._forward_thread = None
                if failed:
                    self.tracker.abandon()
                else:
                    self.stats.forwards += 1
                    self._end("forward")
                    self.decoder.check_damage()
        finally:
            self._forward_depth -= 1
            self._lock.release()

    def is_entered(self, b: int) -> bool:
        """Whether block ``b`` is entered now (its weights may be asked for)."""
        return b in self._entered

    def version(self, key: str) -> int:
        """How many times the weight ``key`` was updated since dispatch (see ``updated``)."""
        return self._versions.get(key, 0)

    def updated(self, key: str) -> None:
        """The weight ``key`` changed (a training step): graphs saved before refuse backward."""
        self._versions[key] = self._versions.get(key, 0) + 1

    def backward_weight(self, key: str) -> torch.Tensor:
        """A weight for backward (the graph kept only a marker): its block is entered, earlier
        backward blocks are released — their ops have been issued by now — and the end of the
        backward pass releases the rest."""
        b = self.store.index(key)
        owner = self._forward_thread
        if owner is not None and owner != threading.get_ident():
            raise RuntimeError(
                "a backward asked for a weight while another thread's forward is running on "
                "the same dispatched model; train one model from one thread (forwards from "
                "several threads are serialized, a backward is not)"
            )
        if not self._in_backward:
            self._in_backward = True
            for fn in self.on_pass_begin:
                fn()
            self.tracker.begin("backward")
            queue_at_end_of_backward(self._end_backward)
        if b not in self._backward_held:
            for held in list(self._backward_held):
                self._backward_held.discard(held)
                self.exit(held)
            self.enter(b)
            self._backward_held.add(b)
        return self.weight(key)

    def _release_backward(self) -> None:
        for held in list(self._backward_held):
            self.exit(held)
        self._backward_held.clear()
        self._in_backward = False

    def abandon_backward(self) -> None:
        """The backward running now failed: release its blocks, record no order, and tell the
        listeners (the trainer drops its partial gradients)."""
        self._release_backward()
        self.tracker.abandon()
        for fn in self.on_backward_abandoned:
            fn()

    def _end_backward(self) -> None:
        self._release_backward()
        self._end("backward")
        for fn in self.on_backward_end:
            fn()
        self.decoder.check_damage()

    def replace(self, key: str, ct: CompressedTensor, ready: object | None = None) -> None:
        """A re-encoded tensor (on the host) takes the place of the old one in its block.

        ``ready``: an event after which its host planes are complete (a device → host copy in
        flight); the block's repacking waits for it before reading them."""
        self.store.replace(key, ct, ready)

    def scratch(self, purpose: str, nbytes: int) -> contextlib.AbstractContextManager[None]:
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
        return self.store.views()

    def block_index(self, key: str) -> int:
        return self.store.index(key)

    def is_resident(self, b: int) -> bool:
        return self.store.blocks[b].tier == DEVICE

    def tier_of(self, key: str) -> str:
        """The tier of the block that holds weight ``key``."""
        return self.store.of(key).tier

    def compressed(self, key: str) -> CompressedTensor:
        """Weight ``key`` compressed, where its bytes are now: on the device (device-compressed),
        in host memory (host), or a placeholder (disk, or resident decoded). Valid until
        close(); host-tier planes stay valid after it (they are views the caller keeps alive)."""
        return self.store.compressed(key)

    def device_buffers(self) -> list[torch.Tensor]:
        """The device memory this executor allocated: slots, staging, the decode workspace,
        resident decoded weights and resident compressed planes (for checks that walk real
        allocations instead of trusting the accountant)."""
        out = [s.buf for s in self._slots] + [s.buf for s in self._staging]
        if self.decoder.workspace is not None:
            out.append(self.decoder.workspace)
        return out + self.store.device_buffers()

    def pending_timings(self) -> int:
        """Device decodes whose duration has not been read yet (only those in flight)."""
        return self.decoder.pending_timings()

    def damage_counts(self) -> torch.Tensor | None:
        """Per block, damaged chunks met by device decodes since the last check (a copy; None
        while no device decoder has run)."""
        return self.decoder.damage_counts()

    # -- the loop ----------------------------------------------------------------------------
    def enter(self, b: int, predictable: bool = True) -> None:
        """Block ``b`` is about to run (``predictable=False``: a data-dependent use, such as an
        embedding lookup, which neither advances nor joins the recorded order)."""
        blk = self.store.blocks[b]
        self.streams.entered(blk.name)  # checking mode: host syncs from here count for blk
        if predictable and not self.experts.routed[b]:  # an expert's use depends on its router
            self.tracker.advance(b)
        held = self._entered.get(b, 0)
        self._entered[b] = held + 1
        routed = self.experts.routed[b]
        if routed and held == 0:
            self.experts.used(b, blk.tier == DEVICE or b in self._slot_of)
        if blk.tier != DEVICE and held == 0:
            s = self._slot_of.get(b)
            if s is None:
                self.stats.misses += 1
                self._note("miss", blk.name)
                protect = self.tracker.window(self.prefetch)
                s = self._claim_slot(protect, group=self.experts.pool[b])
                self._fetch(b, s)
                if routed:
                    self.experts.fetched(blk.decoded_bytes)
            slot = self._slots[s]
            slot.in_use += 1
            self._uses += 1
            slot.last_use = self._uses
            if self.streams.ordered:
                self.streams.compute().wait_event(slot.ready)
        self._note("enter", blk.name, self.accountant.total)
        self._prefetch_window()

    def exit(self, b: int) -> None:
        blk = self.store.blocks[b]
        self._entered[b] -= 1
        if self._entered[b] == 0:
            del self._entered[b]
            if blk.tier != DEVICE:
                slot = self._slots[self._slot_of[b]]
                slot.in_use -= 1
                self._uses += 1
                slot.last_use = self._uses
                if slot.in_use == 0 and self.streams.ordered:
                    slot.free = self.streams.event("slot.free")
                    slot.free.record(self.streams.compute())
        self._note("exit", blk.name, self.accountant.total)
        self.streams.exited(blk.name)

    def weight(self, key: str) -> torch.Tensor:
        blk = self.store.of(key)
        if blk.tier == DEVICE:
            return blk.resident[key]
        if blk.index not in self._entered:
            raise RuntimeError(f"weight {key!r} was asked for outside its block {blk.name!r}")
        slot = self._slots[self._slot_of[blk.index]]
        w = blk.entries[blk.keys.index(key)].view(slot.buf)
        self.streams.read(w, self.streams.compute(), "slot")  # checking mode: compute reads it
        return w

    def _prefetch_window(self) -> None:
        window = self.tracker.window(self.prefetch)
        for b in window:
            blk = self.store.blocks[b]
            if blk.tier == DEVICE or b in self._slot_of:
                continue
            if blk.tier == DISK and not self.reader.ready(b):
                continue  # not read yet: its copy and decode wait for a later step
            s = self._claim_slot(window, required=False, group=self.experts.pool[b])
            if s is None:
                break
            self._fetch(b, s)
        if self.reader is not None:
            ahead = self.tracker.window(self.prefetch + self.read_ahead)
            for b in ahead:
                blk = self.store.blocks[b]
                if blk.tier != DISK or self.reader.requested(b) or b in self._slot_of:
                    continue
                if not self._start_read(b):
                    break

    @property
    def speculating(self) -> bool:
        """Whether experts are guessed and fetched ahead (the plan's ``speculate``)."""
        return self.plan.options.speculate

    def routed(self, blocks: list[int]) -> None:
        """A MoE layer's router picked these expert blocks (before they are entered): the guess
        made for the layer is scored, and only its right part is still spared from eviction."""
        self.experts.routed_now(blocks)

    def speculate(self, blocks: list[int]) -> None:
        """Fetch these expert blocks ahead (guessed for the next MoE layer) into free or least
        recently used shared working slots, never evicting a layer's pool (the cache), a running
        block or a guess."""
        if not blocks:
            return
        xp = self.experts
        xp.new_guess(xp.pool[blocks[0]])
        for b in blocks:
            blk = self.store.blocks[b]
            if blk.tier == DEVICE or b in self._slot_of:
                xp.add_guess(b, False, 0)
                continue
            if blk.tier == DISK:
                xp.add_guess(b, False, 0)
                continue  # the disk reader serves the recorded order; a guess does not wait
            # into the shared working slots only: a wrong guess must not evict the cache
            s = self._claim_slot([], required=False, group=SHARED)
            if s is None:
                xp.add_guess(b, False, 0)
                continue
            self._fetch(b, s)
            xp.add_guess(b, True, blk.decoded_bytes)
            self._note("guess", blk.name)

    def _claim_slot(
        self, protect: list[int], required: bool = True, group: str | None = None
    ) -> int | None:
        """A slot of the pool ``group`` (the regular slots: None; an experts module: its pool
        and the shared working slots) whose block is not running nor about to run (its 'free'
        event guards reuse). For an expert: an empty slot, else the least recently used one,
        sparing the experts guessed for the next layer."""
        keep = set(protect) | set(self._entered) | self.experts.spared()
        mine = {group, SHARED} if group not in (None, SHARED) else {group}
        pool = [i for i, s in enumerate(self._slots) if s.group in mine and s.in_use == 0]
        free = [i for i in pool if self._slots[i].block not in keep]
        if not free:
            free = pool if required else []
        if not free:
            if required:
                raise RuntimeError("no free slot: more blocks are running at once than slots")
            return None
        if group is not None:
            free.sort(key=lambda i: self._slots[i].last_use)
        s = next((i for i in free if self._slots[i].block is None), free[0])
        old = self._slots[s].block
        if old is not None:
            del self._slot_of[old]
            self.experts.evicted(old)
        return s

    def _start_read(self, b: int) -> bool:
        """Hand block ``b`` to the disk reader, if one of its buffers is free."""
        blk = self.store.blocks[b]
        if not self.reader.start(b, blk.cts, blk.layout, blk.locations):
            return False
        self.stats.read_bytes += blk.layout.nbytes
        self._note("read", blk.name)
        return True

    def _fetch(self, b: int, s: int) -> None:
        """Block ``b`` into slot ``s``: copied to staging (host and disk tiers, with copies) on
        the copy stream, then decoded into the slot on the decode stream."""
        blk = self.store.blocks[b]
        slot = self._slots[s]
        slot.block = b
        self._slot_of[b] = s
        self.stats.fetches += 1
        self.stats.decoded_bytes += blk.decoded_bytes
        self._note("request", blk.name)
        st = self.streams
        read = None
        if blk.tier == DISK:
            if not self.reader.requested(b) and not self._start_read(b):
                self.reader.evict()  # a miss needs a buffer that a read-ahead holds
                self._start_read(b)
            host, host_cts, read = self.reader.take(b)
        else:
            if self.store.repack_if_changed(b):
                self._fit_staging(blk.layout.nbytes)
            host, host_cts = blk.host_buf, blk.source_cts
        stage = None
        if blk.tier in (HOST, DISK) and self.copies:
            stage = self._staging[self._next_staging]
            self._next_staging = (self._next_staging + 1) % len(self._staging)
            staged = stage.buf[: blk.layout.nbytes]
            with st.on(st.copy):
                if stage.free is not None:
                    st.copy.wait_event(stage.free)
                st.read(host, st.copy, "pinned host block" if read is None else "disk-read buffer")
                st.write(staged, st.copy, "staging buffer")
                staged.copy_(host, non_blocking=True)
                copied = st.event("copied")
                copied.record(st.copy)
            if read is not None:
                self.reader.copied_out(read, copied)  # refilled only once copied
            else:
                blk.last_copy = copied  # a re-pack overwrites host_buf only after this
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
                st.read(staged, st.decode, "staging buffer")
            st.write(slot.buf, st.decode, "slot")  # checking mode: the decode writes the slot
            self.decoder.decode_block(source, blk.entries, slot.buf, b)
            slot.ready = st.event("slot.ready", timing=True)
            slot.ready.record(st.decode)
            if stage is not None:
                stage.free = st.event("stage.free")
                stage.free.record(st.decode)
        if st.cuda:
            self.stats.decode_seconds += self.decoder.timed(start, slot.ready)
        else:
            self.stats.decode_seconds += time.perf_counter() - t0

    def _fit_staging(self, nbytes: int) -> None:
        """Grow the staging buffers that no longer hold a re-packed block of ``nbytes``."""
        for stage in self._staging:
            if stage.buf.numel() < nbytes:
                if stage.free is not None:
                    stage.free.synchronize()
                self.accountant.release("staging", stage.buf.numel())
                grown = nbytes + nbytes // 16
                stage.buf = self.accountant.allocate("staging", grown, self.device)
                stage.free = None

    # -- bookkeeping -----------------------------------------------------------------------------
    def _note(self, kind: str, *args) -> None:
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, self.accountant.peak)
        if self.log_events:
            self.events.append((kind, *args))

    def settle(self) -> None:
        """Read device-side timings and check decode damage (synchronizes the decode stream)."""
        self.stats.decode_seconds += self.decoder.read_timings(wait=True)
        self.decoder.check_damage()

    def close(self) -> None:
        if self.closed:
            return
        if self.reader is not None:
            self.reader.close()
        self.streams.close()
        self._slots.clear()
        self._staging.clear()
        self.decoder.close()
        self.store.close()
        self.closed = True
