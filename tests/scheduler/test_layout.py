"""Packed blocks and slots (scheduler/layout.py): offsets, alignment, pack and bind."""

from __future__ import annotations

import itertools

import torch

from neuzip_offload.codec import decompress
from neuzip_offload.compressed import PLANE_NAMES
from neuzip_offload.scheduler.layout import (
    PLANE_ALIGN,
    SLOT_ALIGN,
    PackedLayout,
    bind,
    pack,
    slot_layout,
)
from tests.helpers import compressed_blocks, same_bits


def _block():
    weights, blocks, _ = compressed_blocks([[(24, 40), (9,), (3, 5, 7)]])
    return weights[0], blocks[0]


def test_planes_are_packed_aligned_without_overlap_in_plane_order():
    _, data = _block()
    layout = PackedLayout.of(data.cts)
    spans = []
    for ct, entry in zip(data.cts, layout.offsets, strict=True):
        assert list(entry) == [k for k in PLANE_NAMES if k in ct.planes]
        for k, (off, n) in entry.items():
            assert off % PLANE_ALIGN == 0 and n == ct.planes[k].numel()
            spans.append((off, off + n))
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert layout.nbytes % PLANE_ALIGN == 0 and spans[-1][1] <= layout.nbytes


def test_pack_then_bind_gives_views_of_one_buffer_that_decode_exactly():
    weights, data = _block()
    layout = PackedLayout.of(data.cts)
    sizes = []
    buf = pack(data.cts, lambda n: sizes.append(n) or torch.full((n,), 0xEE, dtype=torch.uint8))
    assert sizes == [layout.nbytes]
    bound = bind(data.cts, layout, buf)
    for ct, b, w in zip(data.cts, bound, weights, strict=True):
        for k, p in b.planes.items():
            assert p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert torch.equal(p, ct.planes[k].reshape(-1))
        assert same_bits(decompress(b), w)
    # a second buffer with the same bytes rebinds the same tensors (as staging does)
    other = buf.clone()
    rebound = bind(bound, layout, other)
    assert all(same_bits(decompress(b), w) for b, w in zip(rebound, weights, strict=True))


def test_slot_entries_are_aligned_views_that_do_not_overlap():
    weights, data = _block()
    entries, nbytes = slot_layout(data.cts, data.keys)
    assert [e.key for e in entries] == data.keys
    assert nbytes % SLOT_ALIGN == 0
    slot = torch.zeros(nbytes, dtype=torch.uint8)
    for e, w in zip(entries, weights, strict=True):
        assert e.offset % SLOT_ALIGN == 0 and e.nbytes == w.numel() * w.element_size()
        e.view(slot).copy_(w)
    for e, w in zip(entries, weights, strict=True):  # no write overwrote another weight
        v = e.view(slot)
        assert v.shape == w.shape and v.dtype == w.dtype and same_bits(v, w)
    assert entries[-1].offset + entries[-1].nbytes <= nbytes
