"""The disk tier's way into memory: positional reads of a packed block, and the reader thread.

Blocks planned on disk keep their planes in the checkpoint's shards (``PlaneLocation``). A
``DiskReader`` owns a ring of pinned host staging buffers (carved from the executor's host
arena) and one background thread that reads a block's planes into a free buffer and checks
them, ``prefetch + read_ahead`` blocks ahead of their use, so that disk → host → device is one
pipeline. The thread only reads files and checks CRCs: all CUDA work (the copy out of the
buffer) is issued by the executor on the calling thread, and the copy's event tells the reader
when the buffer may be refilled.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from neuzip_offload.compressed import CompressedTensor, DamagedDataError, planes_crc
from neuzip_offload.storage import PlaneLocation, pread_into

from .layout import PackedLayout, bind
from .streams import Streams


def read_packed(
    cts: list[CompressedTensor],
    layout: PackedLayout,
    locations: list[dict[str, PlaneLocation]],
    buf: torch.Tensor,
) -> list[CompressedTensor]:
    """Read every plane of a block from disk into ``buf`` at its packed offsets, then check each
    tensor (sizes, CRC-32, coder index): a damaged file raises DamagedDataError naming it."""
    for entry, locs, ct in zip(layout.offsets, locations, cts, strict=True):
        for k, (off, n) in entry.items():
            loc = locs.get(k)
            if loc is None or loc.nbytes != n:
                raise DamagedDataError(f"{ct.name}: plane {k!r} is missing or mis-sized on disk")
            pread_into(loc, buf[off : off + n])
    bound = bind(cts, layout, buf)
    for ct, locs in zip(bound, locations, strict=True):
        files = sorted({loc.path.name for loc in locs.values()})
        try:
            if planes_crc(ct.planes) != ct.header.crc:
                raise DamagedDataError(f"{ct.name}: the data fails its checksum")
            problem = ct.structure_problem()
            if problem:
                raise DamagedDataError(f"{ct.name}: {problem}")
        except DamagedDataError as e:
            raise DamagedDataError(f"{', '.join(files)}: {e}") from None
    return bound


@dataclass
class _Buffer:
    """One pinned staging buffer of the ring, and the block read (or being read) into it."""

    buf: torch.Tensor
    block: int | None = None
    nbytes: int = 0
    future: Future | None = None
    free: object | None = None  # copy-stream event after which the buffer may be overwritten


class DiskReader:
    """Background reads of disk blocks into a ring of pinned staging buffers.

    ``start`` hands a block to the thread if a buffer is free; ``take`` waits for its read and
    hands the buffer to the caller (it is free again for the next ``start``, which waits for the
    event given to ``copied_out`` before overwriting it); ``evict`` drops a read that was not
    taken, so a block needed now (a miss) can have its buffer."""

    def __init__(self, buffers: list[torch.Tensor], streams: Streams):
        self._ring = [_Buffer(b) for b in buffers]
        self._of: dict[int, int] = {}  # block → its buffer in the ring
        self._streams = streams
        # One thread, not the shared pool: reads run one at a time in the order they were
        # started (the order blocks are needed in), and a long read never holds up a decode.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuzip-disk")

    @property
    def size(self) -> int:
        """Buffers in the ring."""
        return len(self._ring)

    def held(self) -> int:
        """Buffers holding a block read (or being read) and not taken yet."""
        return len(self._of)

    def requested(self, b: int) -> bool:
        """Whether block ``b`` is being read or has been read and not taken."""
        return b in self._of

    def ready(self, b: int) -> bool:
        """Whether block ``b``'s read has finished (its take will not wait)."""
        i = self._of.get(b)
        return i is not None and self._ring[i].future.done()

    def start(
        self,
        b: int,
        cts: list[CompressedTensor],
        layout: PackedLayout,
        locations: list[dict[str, PlaneLocation]],
    ) -> bool:
        """Hand block ``b`` (placeholders ``cts`` of its tensors, where their planes sit in
        files) to the background thread, if a buffer is free; False if none is."""
        i = next((i for i, r in enumerate(self._ring) if r.block is None), None)
        if i is None:
            return False
        r = self._ring[i]
        buf = r.buf[: layout.nbytes]
        wait = r.free
        streams = self._streams

        def read() -> list[CompressedTensor]:
            if wait is not None:
                wait.synchronize()  # the last copy out of this buffer has finished
            streams.write(buf, None, "disk-read buffer")  # checking mode: this thread writes
            return read_packed(cts, layout, locations, buf)

        r.block, r.nbytes, r.future, r.free = b, layout.nbytes, self._thread.submit(read), None
        self._of[b] = i
        return True

    def take(self, b: int) -> tuple[torch.Tensor, list[CompressedTensor], int]:
        """Block ``b`` (started before) in host staging: (its bytes, its tensors bound to them,
        the buffer's index for ``copied_out``). Waits on the host for the file read only."""
        i = self._of.pop(b)
        r = self._ring[i]
        cts = r.future.result()  # re-raises the read's DamagedDataError here
        self._streams.host_joined(r.buf)  # checking mode: the reader's writes come before ours
        r.block, r.future = None, None
        return r.buf[: r.nbytes], cts, i

    def copied_out(self, i: int, event: object) -> None:
        """The copy out of buffer ``i`` was issued: the buffer is refilled only after ``event``."""
        self._ring[i].free = event

    def evict(self) -> int:
        """Drop a read that was not taken yet (waiting for it to finish): its block's index."""
        r = next(r for r in self._ring if r.block is not None)
        r.future.result()
        b = r.block
        del self._of[b]
        r.block, r.future = None, None
        return b

    def close(self) -> None:
        """Wait for the reads in flight and stop the thread; the buffers are let go."""
        self._thread.shutdown(wait=True)
        self._ring.clear()
        self._of.clear()
