"""Decoding blocks into device memory for the executor, and what decoding reports back.

The executor says what to decode where (a block's compressed tensors into its slot or into
resident tensors) and on which stream; the Decoder runs ``codec.decode_into`` with the one decode
workspace the plan counts, and keeps what device decodes report without synchronizing per block:

- damage: a device decoder returns a per-chunk status (1 = ok); its bad chunks are added at once,
  on the decode stream, to a per-block counter on the device, so no status tensor outlives its
  decode; ``check_damage`` copies the counters to pinned memory and waits for that copy once per
  forward and backward, raising DamagedDataError naming the damaged blocks;
- timings: (start, end) CUDA events of decodes in flight, read as they complete.

The CPU backend decodes a block's tensors in one batch (``decompress_many``: zstd frames of all
of them go to the pool at once) and checks as it decodes.
"""

from __future__ import annotations

import collections
from concurrent.futures import Executor as ThreadPool

import torch

from neuzip_offload import backend
from neuzip_offload.codec import decode_into, decompress_many
from neuzip_offload.compressed import CompressedTensor, DamagedDataError

from .accounting import Accountant
from .layout import SlotEntry
from .streams import Streams


class Decoder:
    """The decode workspace, per-block damage counts and pending timings of one executor."""

    def __init__(
        self,
        names: list[str],
        streams: Streams,
        accountant: Accountant,
        workspace_bytes: int,
        pool: ThreadPool | None = None,
    ):
        self.names = names  # block names, for error messages
        self.streams = streams
        self.pool = pool
        device = streams.device
        # Device decoders run tensor by tensor and report damage per chunk; the CPU backend
        # decodes a block's tensors in one batch. (Tests turn the former on under Triton's
        # interpreter.)
        self.per_tensor = device.type == "cuda"
        self._damage: torch.Tensor | None = None
        self._damage_host: torch.Tensor | None = None
        if device.type == "cuda":
            n = len(names)
            held = accountant.allocate("decode status", 4 * n, device)
            self._damage = held.view(torch.int32).zero_()
            self._damage_host = backend.empty_pinned(4 * n).view(torch.int32)
        self.workspace = (
            accountant.allocate("decode workspace", workspace_bytes, device)
            if workspace_bytes
            else None
        )
        # (start, end) timing events of device decodes not read yet: drained as they complete,
        # so the queue holds only decodes in flight
        self._timings: collections.deque = collections.deque()

    def decode(self, ct: CompressedTensor, out: torch.Tensor, b: int) -> None:
        """Decode ``ct`` into ``out`` on the current stream; a device decode's bad chunks are
        added to block ``b``'s damage count there and then."""
        status = decode_into(ct, out.view(-1), pool=self.pool, workspace=self._workspace_for(ct))
        if status is not None:
            if self._damage is None:  # a device decoder on the CPU (tests force Triton there)
                self._damage = torch.zeros(len(self.names), dtype=torch.int32)
            self._damage[b].add_((status == 0).sum(dtype=torch.int32))

    def decode_block(
        self, cts: list[CompressedTensor], entries: list[SlotEntry], slot: torch.Tensor, b: int
    ) -> None:
        """Decode block ``b``'s tensors into their places in ``slot``, on the current stream."""
        if self.per_tensor:
            for entry, ct in zip(entries, cts, strict=True):
                self.decode(ct, entry.view(slot), b)
        else:  # all frames of the block's tensors go to the pool at once; no checksum here:
            # host and disk blocks were checked when they were made or read
            decompress_many(cts, [e.view(slot) for e in entries], pool=self.pool, verify=False)

    def _workspace_for(self, ct: CompressedTensor) -> torch.Tensor | None:
        """The decode workspace, if it is large enough (else the decoder makes its own)."""
        ws = self.workspace
        if ws is None:
            return None
        if ct.device.type == "cuda":
            need = 4 * (ct.header.n_chunks << ct.header.prob_bits)
            return ws[:need].view(torch.int32) if ct.codec == "ans" and need <= ws.numel() else None
        return ws[: ct.numel] if ct.numel <= ws.numel() else None

    # -- timings -----------------------------------------------------------------------------
    def timed(self, start: object, end: object) -> float:
        """A device decode between CUDA events ``start`` and ``end`` was issued: seconds of the
        decodes finished by now (this one's later, when it has finished)."""
        self._timings.append((start, end))
        return self.read_timings(wait=False)

    def read_timings(self, wait: bool) -> float:
        """Seconds of finished device decodes not read yet (``wait``: of all of them, after
        synchronizing the decode stream; else only those done, without waiting)."""
        if wait and self._timings:
            self.streams.decode.synchronize()
        seconds = 0.0
        while self._timings and (wait or self._timings[0][1].query()):
            start, end = self._timings.popleft()
            seconds += start.elapsed_time(end) / 1e3
        return seconds

    def pending_timings(self) -> int:
        """Device decodes whose duration has not been read yet (only those in flight)."""
        return len(self._timings)

    # -- damage ------------------------------------------------------------------------------
    def damage_counts(self) -> torch.Tensor | None:
        """Per block, damaged chunks met by device decodes since the last check (a copy; None
        while no device decoder has run)."""
        return None if self._damage is None else self._damage.clone()

    def check_damage(self) -> None:
        """Raise DamagedDataError if a device decode since the last check met a damaged chunk.

        On CUDA the counts are copied to pinned memory behind the decodes issued so far and
        that copy is waited for: the one synchronization per forward (and per backward) that
        turns device-side damage into an error before the results are used."""
        if self._damage is None:
            return
        st = self.streams
        if st.cuda:
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
        with st.on(st.decode):
            self._damage.zero_()
        names = [self.names[b] for b in bad]
        raise DamagedDataError(
            f"decoding on {st.device} met damaged data in block(s) {', '.join(names)}: "
            "a rANS chunk did not end in its final state"
        )

    def close(self) -> None:
        self.workspace = None
