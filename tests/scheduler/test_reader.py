"""The disk tier's reader (scheduler/reader.py): positional reads, the staging ring, eviction.

Blocks are written plane by plane into a file at odd offsets, as a checkpoint shard holds them;
the oracles are the file's own bytes (read with plain file I/O) and the original weights.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from pathlib import Path

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload import backend
from neuzip_offload.codec import decompress
from neuzip_offload.compressed import PLANE_NAMES
from neuzip_offload.scheduler.layout import PackedLayout
from neuzip_offload.scheduler.plan import DISK, PlanOptions, make_plan
from neuzip_offload.scheduler.reader import DiskReader
from neuzip_offload.scheduler.store import BlockData
from neuzip_offload.scheduler.streams import Streams
from neuzip_offload.storage import PlaneLocation
from tests.helpers import compressed_blocks, same_bits

CPU = torch.device("cpu")
SHAPES = [[(24, 40), (9,), (40, 24)]] * 6


def _on_disk(path: Path, shapes=SHAPES):
    """(weights, BlockData with placeholders and file locations, specs marked on disk)."""
    weights, blocks, specs = compressed_blocks(shapes)
    out = []
    with open(path, "wb") as f:
        f.write(b"header!")  # planes start at unaligned offsets, as in a shard
        for data in blocks:
            locations = []
            for ct in data.cts:
                locs = {}
                for k in PLANE_NAMES:
                    if k in ct.planes:
                        raw = ct.planes[k].contiguous().numpy().tobytes()
                        locs[k] = PlaneLocation(path, f.tell(), len(raw))
                        f.write(raw + b"\x00" * 3)
                locations.append(locs)
            placeholders = [ct.placeholder() for ct in data.cts]
            out.append(BlockData(data.name, data.keys, placeholders, locations))
    specs = [dataclasses.replace(s, on_disk=True) for s in specs]
    return weights, out, specs


def _file_bytes(loc: PlaneLocation) -> bytes:
    with open(loc.path, "rb") as f:
        f.seek(loc.offset)
        return f.read(loc.nbytes)


def _reader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("neuzip-disk")}


class _Event:
    """A copy-stream event stand-in that records whether anyone waited for it."""

    def __init__(self):
        self.waited = False

    def synchronize(self):
        self.waited = True


def _check_taken(buf, cts, data: BlockData, originals) -> None:
    """The staged bytes are the file's, plane by plane, and they decode to the weights."""
    layout = PackedLayout.of(data.cts)
    assert buf.numel() == layout.nbytes
    for entry, locs in zip(layout.offsets, data.locations, strict=True):
        for k, (off, n) in entry.items():
            assert buf[off : off + n].numpy().tobytes() == _file_bytes(locs[k])
    for ct, w in zip(cts, originals, strict=True):
        assert same_bits(decompress(ct), w)


def test_the_ring_reads_takes_and_evicts(tmp_path):
    weights, blocks, _ = _on_disk(tmp_path / "shard")
    size = max(PackedLayout.of(d.cts).nbytes for d in blocks)
    ring = [backend.empty_pinned(size) for _ in range(2)]
    reader = DiskReader(ring, Streams(CPU))

    def start(b: int) -> bool:
        d = blocks[b]
        return reader.start(b, d.cts, PackedLayout.of(d.cts), d.locations)

    before = _reader_threads()
    assert start(0) and start(1)
    ours = _reader_threads() - before  # its thread runs from the first read on
    assert len(ours) == 1
    assert not start(2)  # the ring is full: the caller must wait or evict
    assert reader.held() == 2 and reader.requested(0) and not reader.requested(2)
    buf, cts, i = reader.take(0)
    _check_taken(buf, cts, blocks[0], weights[0])
    assert reader.held() == 1 and not reader.requested(0)
    # the buffer taken is refilled only after the copy out of it has finished
    copied = _Event()
    reader.copied_out(i, copied)
    assert start(2)
    buf, cts, _ = reader.take(2)
    assert copied.waited
    _check_taken(buf, cts, blocks[2], weights[2])
    # eviction: block 1's read was never taken; a miss on block 3 needs its buffer
    assert start(3)
    assert not start(4)
    evicted = reader.evict()
    assert evicted in (1, 3) and not reader.requested(evicted) and reader.held() == 1
    assert start(4) and start(evicted) is False  # the ring is full again
    for b in (4, 1 if evicted == 3 else 3):
        buf, cts, _ = reader.take(b)
        _check_taken(buf, cts, blocks[b], weights[b])
    assert start(evicted)  # read again after its eviction: the same bytes
    buf, cts, _ = reader.take(evicted)
    _check_taken(buf, cts, blocks[evicted], weights[evicted])
    assert reader.held() == 0
    reader.close()
    assert not any(t.is_alive() for t in ours)


def test_a_damaged_file_is_named_when_its_read_is_taken(tmp_path):
    _, blocks, _ = _on_disk(tmp_path / "shard")
    loc = blocks[1].locations[0]["raw"]
    with open(loc.path, "r+b") as f:
        f.seek(loc.offset + loc.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x5A]))
    d = blocks[1]
    reader = DiskReader([backend.empty_pinned(PackedLayout.of(d.cts).nbytes)], Streams(CPU))
    assert reader.start(1, d.cts, PackedLayout.of(d.cts), d.locations)
    with pytest.raises(nzo.DamagedDataError, match="shard"):
        reader.take(1)
    reader.close()


def _disk_executor(path: Path, copies: bool, prefetch: int = 1, read_ahead: int = 1):
    from neuzip_offload.scheduler.executor import Executor

    weights, blocks, specs = _on_disk(path)
    largest = max(s.compressed_bytes for s in specs)
    ring = prefetch + read_ahead
    o = PlanOptions(
        device_bytes=1,
        host_bytes=ring * largest,  # room for the reader's ring only: every block on disk
        prefetch=prefetch,
        read_ahead=read_ahead,
        copies=copies,
        device="cpu",
        disk=True,
    )
    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, o)
    plan = make_plan(specs, dataclasses.replace(o, device_bytes=e.value.minimum_device_bytes))
    assert plan.n_disk_staging == ring and plan.tiers.count(DISK) >= 4
    return weights, Executor(plan, blocks, CPU)


def _forward(ex, weights, order, unpredictable=()) -> None:
    ex.begin_forward()
    for b in order:
        ex.enter(b, predictable=b not in unpredictable)
        for j, w in enumerate(weights[b]):
            assert same_bits(ex.weight(f"b{b}.w{j}"), w)
        ex.exit(b)
        assert ex.reader.held() <= ex.reader.size
    ex.end_forward()


@pytest.mark.parametrize("copies", [False, True])
def test_reads_evicted_for_misses_are_read_again_and_stay_exact(tmp_path, copies):
    """A ring of two buffers against forwards that leave the recorded order: the reads ahead
    are evicted for the misses, read again later, every weight stays bit-exact, and the ring,
    the reader thread and the tensors alive stay bounded."""
    weights, ex = _disk_executor(tmp_path / "shard", copies)
    n = len(weights)
    before = _reader_threads()
    _forward(ex, weights, range(n))  # records the order 0 .. n-1
    ours = _reader_threads() - before
    assert len(ours) == 1

    def alive() -> int:
        # the reads ahead finish first, so that each count sees their tensors
        while any(ex.reader.requested(b) and not ex.reader.ready(b) for b in range(n)):
            time.sleep(0.001)
        gc.collect()
        return sum(type(o) is torch.Tensor for o in gc.get_objects())

    counts = []
    for _ in range(12):
        _forward(ex, weights, [0, 4, 1, 5, 2, 3], unpredictable={4, 5})
        counts.append(alive())
    # A leak grows every count after it: the last four would all exceed the first four. The
    # count is of the whole process (gc), so one stray tensor of another thread may show once.
    assert min(counts[-4:]) <= max(counts[:4]), counts
    disk = {b.name for b in ex.blocks() if b.tier == DISK}
    reads = sum(1 for ev in ex.events if ev[0] == "read")
    takes = sum(1 for ev in ex.events if ev[0] == "request" and ev[1] in disk)
    evicted = reads - takes - ex.reader.held()
    # reads dropped for misses (how many depends on how fast the reader thread runs: about
    # one forward in two or more)
    assert evicted > 0
    ex.close()
    assert not any(t.is_alive() for t in ours)
