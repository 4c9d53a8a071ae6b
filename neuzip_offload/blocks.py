"""Weights → blocks: what the planner sizes (BlockSpec) and what the executor holds (BlockData).

Second step of the data path: model_analysis.py found the weights and their blocks; here they
are grouped in module order (a block root's pieces together, every other piece alone) and
sized. One function serves both moments of a dispatch:

- *estimated*, before anything is compressed (``bits`` per weight): plan_model, the choice of
  granularity and the early refusal of a hopeless budget;
- *measured*, after compressing (``compressed`` tensors, and their files' ``locations`` for a
  loaded checkpoint): the plan the executor runs. Blocks a lossless plan keeps decoded are not
  encoded at all (planning.py): their ``compressed`` entries are stand-ins (sizing.py: exact
  but for the coded exponents) and their ``decoded`` weights go to the executor as they are.

Both use the same grouping and the same decoded sizes (slot entries aligned to 256 bytes), so
an estimated plan and the measured one differ only in the compressed bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .compressed import CompressedTensor
from .kernels import ans
from .model_analysis import Weight
from .scheduler.layout import SLOT_ALIGN, PackedLayout, slot_layout
from .scheduler.plan import BlockSpec
from .scheduler.store import BlockData
from .storage import PlaneLocation

HEADER_BYTES_ESTIMATE = 1024  # a piece's header and index, before it exists
# rANS symbols per chunk, and its probability bits, for estimates
ESTIMATE_CHUNK = ans.DEFAULT_CHUNK
ESTIMATE_PROB_BITS = ans.DEFAULT_PROB_BITS


@dataclass(frozen=True)
class Member:
    """One piece of a block: its key and its number of weights and dtype."""

    key: str
    numel: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Group:
    """A block before sizing: its name, its pieces in order, its uses per forward."""

    name: str
    members: tuple[Member, ...]
    uses: float
    routed: str | None = None  # an expert's block: its experts module (entered when routed)


def groups(weights: list[Weight]) -> list[Group]:
    """The blocks in module order: a root's pieces together (at its first weight), each piece of
    a weight outside the roots alone (used once per user: a tied embedding twice)."""
    out: list[Group] = []
    seen: set[str] = set()
    for w in weights:
        if w.kind.per_index:  # expert e of every fused tensor of one experts module
            owner = w.users[0][0]
            if owner in seen:
                continue
            seen.add(owner)
            fused = [v for v in weights if v.kind.per_index and v.users[0][0] == owner]
            top_k, n = w.routing
            out.extend(
                Group(
                    f"{owner}[{e}]",
                    tuple(Member(v.pieces[e][0], v.piece_numel(e, e + 1), v.dtype) for v in fused),
                    top_k / n,  # expected uses per token: top_k of n, routed uniformly
                    routed=owner,
                )
                for e in range(n)
            )
        elif w.root is None:
            out.extend(
                Group(key, (Member(key, w.piece_numel(a, b), w.dtype),), len(w.users))
                for key, a, b in w.pieces
            )
        elif w.root not in seen:
            seen.add(w.root)
            members = tuple(
                Member(key, v.piece_numel(a, b), v.dtype)
                for v in weights
                if v.root == w.root
                for key, a, b in v.pieces
            )
            if w.routed is None:
                out.append(Group(w.root, members, 1))
            else:  # an expert of a ModuleList: used when routed, top_k of n per token
                top_k, n = w.routing
                out.append(Group(w.root, members, top_k / n, routed=w.routed))
    return out


def build(
    weights: list[Weight],
    device: torch.device,
    *,
    bits: float | None = None,
    on_disk: bool = False,
    compressed: Mapping[str, CompressedTensor] | None = None,
    locations: Mapping[str, dict[str, PlaneLocation]] | None = None,
    decoded: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[BlockSpec], list[BlockData]]:
    """(specs for the planner, data for the executor), one per block in module order.

    Estimated with ``bits`` (compressed bytes from bits per weight; ``on_disk``: every block
    can be read from a file; no data), or measured from ``compressed`` (every piece's tensor;
    ``locations``: the files of the pieces a checkpoint holds; ``decoded``: the weights of the
    pieces never encoded, whose ``compressed`` entries are stand-ins — a block has all its
    pieces encoded or none)."""
    if (bits is None) == (compressed is None):
        raise ValueError("pass bits (an estimate) or compressed (measured sizes), not both")
    specs, data = [], []
    for g in groups(weights):
        if compressed is None:
            specs.append(_estimated(g, device, bits, on_disk))
            continue
        keys = [m.key for m in g.members]
        cts = [compressed[k] for k in keys]
        files, raw = locations or {}, decoded or {}
        held_on_disk = all(k in files for k in keys)
        unencoded = [k in raw for k in keys]
        if any(unencoded) and not all(unencoded):
            raise ValueError(f"block {g.name!r} has pieces encoded and pieces not")
        specs.append(_measured(g, cts, device, held_on_disk, encoded=not any(unencoded)))
        data.append(
            BlockData(
                g.name,
                keys,
                cts,
                [files[k] for k in keys] if held_on_disk else None,
                [raw[k] for k in keys] if any(unencoded) else None,
            )
        )
    return specs, data


def _decoded_bytes(members: tuple[Member, ...]) -> int:
    """Slot bytes: every tensor at an aligned offset (scheduler/layout.py slot_layout)."""
    a = SLOT_ALIGN
    return sum((m.numel * m.dtype.itemsize + a - 1) // a * a for m in members)


def _estimated(g: Group, device: torch.device, bits: float, on_disk: bool) -> BlockSpec:
    largest = max(m.numel for m in g.members)
    chunks = sum((m.numel + ESTIMATE_CHUNK - 1) // ESTIMATE_CHUNK for m in g.members)
    # the decoder's scratch: rANS decode tables (per chunk of the block: its tensors decode in
    # one launch) on CUDA, zstd symbols on the host
    ws = 4 * ans.table_words(chunks, ESTIMATE_PROB_BITS) if device.type == "cuda" else largest
    return BlockSpec(
        g.name,
        sum(m.numel for m in g.members),
        _decoded_bytes(g.members),
        sum(int(m.numel * bits / 8) + HEADER_BYTES_ESTIMATE for m in g.members),
        ws,
        g.uses,
        on_disk=on_disk,
        setup_bytes=int(largest * bits / 8) + HEADER_BYTES_ESTIMATE,
        routed=g.routed,
    )


def _measured(
    g: Group, cts: list[CompressedTensor], device: torch.device, on_disk: bool, encoded: bool
) -> BlockSpec:
    _, slot_bytes = slot_layout(cts, [m.key for m in g.members])
    if device.type == "cuda":  # rANS decode tables: the block's tensors in one launch
        ans_cts = [ct.header for ct in cts if ct.codec == "ans"]
        ws = sum(4 * ans.table_words(h.n_chunks, h.prob_bits) for h in ans_cts)
    else:  # the zstd symbol buffer
        ws = max((ct.numel for ct in cts if ct.codec == "zstd"), default=0)
    return BlockSpec(
        g.name,
        sum(ct.numel for ct in cts),
        slot_bytes,
        PackedLayout.of(cts).nbytes + sum(ct.header_nbytes for ct in cts),
        ws,
        g.uses,
        stored_bytes=sum(ct.nbytes for ct in cts),
        on_disk=on_disk,
        # made resident decoded, its tensors visit the device compressed one at a time (where
        # blocks are copied: the plan counts it only then); a block never encoded arrives
        # decoded: nothing visits beside it
        setup_bytes=max((ct.nbytes for ct in cts), default=0) if encoded else 0,
        routed=g.routed,
    )
