"""Decoding blocks into device memory for the executor, and what decoding reports back.

The executor says what to decode where (a block's compressed tensors into its slot or into
resident tensors) and on which stream; the Decoder decodes them with the one decode workspace
the plan counts, and keeps what device decodes report without synchronizing per block:

- damage: the device decode launch of a block counts its damaged chunks (those that do not end
  in their final state) into a per-block counter on the device (a tensor decoded alone adds
  its per-chunk status there at once), so no status tensor outlives its decode;
  ``check_damage`` copies the counters to pinned memory and waits for that copy once per
  forward and backward, raising DamagedDataError naming the damaged blocks;
- timings: (start, end) CUDA events of decodes in flight, read as they complete.

On the device a block's rANS tensors that share coding settings (all of a layer's, in practice)
decode in one Triton launch over all their chunks, straight into the slot: their planes are
views of the block's one packed buffer and their outputs views of the slot, so a tensor table
of offsets (ans_triton.decode_block_triton) is all the launch needs (1 LUT launch + 1 decode
launch per block, where there were 2 per tensor). Other tensors (zstd) take
``codec.decode_into`` one at a time. The CPU backend decodes a block's tensors in one batch
(``decompress_many``: zstd frames of all of them go to the pool at once) and checks as it
decodes.
"""

from __future__ import annotations

import collections
from concurrent.futures import Executor as ThreadPool

import torch

from neuzip_offload import backend
from neuzip_offload.codec import decode_into, decompress_many
from neuzip_offload.compressed import CompressedTensor, DamagedDataError
from neuzip_offload.kernels import HAS_TRITON, ans, ans_triton, planes

from .accounting import Accountant
from .layout import SlotEntry
from .streams import Streams


def _launch_key(ct: CompressedTensor) -> tuple:
    """What a decode launch specializes on: tensors with equal keys share one launch."""
    h = ct.header
    return (
        h.lossy,
        h.dtype,
        h.mantissa_bits,
        h.block_size,
        h.chunk_size,
        h.lanes,
        h.prob_bits,
        "scales" in ct.planes,
    )


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
        # Device decoders run a block's rANS tensors in one launch and count damage on the
        # device; the CPU backend decodes a block's tensors in one batch. (Tests turn the
        # former on under Triton's interpreter.)
        self.on_device = device.type == "cuda"
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

    def _damage_of(self, b: int) -> torch.Tensor:
        """Block ``b``'s damage counter (int32 [1], on the device)."""
        if self._damage is None:  # a device decoder on the CPU (tests force Triton there)
            self._damage = torch.zeros(len(self.names), dtype=torch.int32)
        return self._damage[b : b + 1]

    def decode(self, ct: CompressedTensor, out: torch.Tensor, b: int) -> None:
        """Decode ``ct`` into ``out`` on the current stream; a device decode's bad chunks are
        added to block ``b``'s damage count there and then."""
        ws = self.workspace
        if ct.device.type == "cuda":  # rANS slot tables (zstd on the device takes none)
            h = ct.header
            words = ans.table_words(h.n_chunks, h.prob_bits)
            ws = self._table_workspace(words) if ct.codec == "ans" else None
        elif ws is not None:  # the zstd symbol buffer on the host
            ws = ws[: ct.numel] if ct.numel <= ws.numel() else None
        status = decode_into(ct, out.view(-1), pool=self.pool, workspace=ws)
        if status is not None:
            self._damage_of(b).add_((status == 0).sum(dtype=torch.int32))

    def decode_block(
        self, cts: list[CompressedTensor], entries: list[SlotEntry], slot: torch.Tensor, b: int
    ) -> None:
        """Decode block ``b``'s tensors into their places in ``slot``, on the current stream."""
        outs = [e.view(slot).view(-1) for e in entries]
        if not self.on_device:  # all frames of the block's tensors go to the pool at once; no
            # checksum here: host and disk blocks were checked when they were made or read
            decompress_many(cts, outs, pool=self.pool, verify=False)
            return
        launches: dict[tuple, list[int]] = {}  # rANS tensors by kernel specialization
        for i, ct in enumerate(cts):
            if HAS_TRITON and ct.codec == "ans" and ct.numel:
                launches.setdefault(_launch_key(ct), []).append(i)
            else:
                self.decode(ct, outs[i], b)
        for members in launches.values():
            h = cts[members[0]].header
            jobs = [
                ans_triton.DecodeJob(
                    cts[i].ans_stream(), cts[i].planes["raw"], cts[i].planes.get("scales"), outs[i]
                )
                for i in members
            ]
            chunks = sum(cts[i].header.n_chunks for i in members)
            ans_triton.decode_block_triton(
                jobs,
                fmt=planes.FMT_LOSSY if h.lossy else planes.FMT_OF[h.dtype],
                mantissa_bits=h.mantissa_bits,
                block_size=h.block_size,
                chunk_size=h.chunk_size,
                lanes=h.lanes,
                prob_bits=h.prob_bits,
                workspace=self._table_workspace(ans.table_words(chunks, h.prob_bits)),
                damage=self._damage_of(b),
            )

    def _table_workspace(self, words: int) -> torch.Tensor | None:
        """``words`` int32 words of the decode workspace (rANS decode tables), if it is on the
        device and large enough (else the decoder makes its own)."""
        ws = self.workspace
        if ws is None or ws.device.type != "cuda" or 4 * words > ws.numel():
            return None
        return ws[: 4 * words].view(torch.int32)

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
