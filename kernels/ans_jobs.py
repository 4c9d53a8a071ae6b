"""The host side of a decode launch (ans_triton.py): the jobs it takes and their tensor table.

A launch decodes several tensors whose planes of each kind view one storage (a packed block's
buffer) into outputs that view one storage (a slot). The tensor table gives each tensor one int64
row: where its planes and output start in those storages, its size, its first program. This
module builds it; the kernel reads it by the _R_* field numbers in ans_triton.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import planes_triton
from .ans import AnsStream, n_chunks


@dataclass(frozen=True)
class DecodeJob:
    """One tensor for :func:`decode_block_triton`: its (validated) stream, raw plane, block
    scales (lossy with normalization) and 1-D output, and the first chunk to decode."""

    stream: AnsStream
    raw: torch.Tensor
    scales: torch.Tensor | None
    out: torch.Tensor
    first_chunk: int = 0


# The planes a launch reads and writes, by tensor-table field (ans_triton's _R_* constants); each
# is passed as one base pointer, a view of the storage the planes of that kind share
PLANE_FIELDS = (
    ("words", 3),
    ("states", 4),
    ("word_offsets", 5),
    ("table_lo", 6),
    ("table_len", 7),
    ("table_freq", 8),
    ("raw", 10),
    ("scales", 11),
    ("out", 12),
)
ROW_FIELDS = 16  # int64 fields per row (the kernel's _ROW)


def planes_of(job: DecodeJob) -> dict[str, torch.Tensor]:
    st = job.stream
    return {
        "words": st.words,
        "states": st.states,
        "word_offsets": st.word_offsets,
        "table_lo": st.table_lo,
        "table_len": st.table_len,
        "table_freq": st.table_freq,
        "raw": job.raw,
        "scales": job.raw if job.scales is None else job.scales,
        "out": planes_triton.out_bits_view(job.out),
    }


def _storage_at(t: torch.Tensor) -> int | None:
    """Address of the storage ``t`` views (None for an empty tensor: it is never read)."""
    return t.untyped_storage().data_ptr() if t.numel() else None


def same_storages(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether every plane of ``b`` views the storage of the same plane of ``a`` (or is empty)."""
    for name, _ in PLANE_FIELDS:
        sa, sb = _storage_at(a[name]), _storage_at(b[name])
        if sa is not None and sb is not None and sa != sb:
            return False
    return True


def _base_and_offsets(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """A view (in their dtype) of the storage ``tensors`` view, and each one's element offset
    into it (0 for an empty tensor)."""
    held = [t for t in tensors if t.numel()]
    if not held:
        return tensors[0], [0] * len(tensors)
    storage = held[0].untyped_storage()
    at, dtype = storage.data_ptr(), held[0].dtype
    base = torch.empty(0, dtype=dtype, device=held[0].device)
    base.set_(storage, 0, (storage.nbytes() // dtype.itemsize,))
    return base, [(t.data_ptr() - at) // dtype.itemsize if t.numel() else 0 for t in tensors]


def tensor_table(
    jobs: list[DecodeJob], chunk_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(tensor table, base pointer per plane kind, programs) of one launch over ``jobs``, whose
    planes of each kind view one storage. The table is int64 [len(jobs), ROW_FIELDS] on the
    jobs' device (ans_triton's _R_* fields)."""
    dev = jobs[0].out.device
    planes_ = [planes_of(j) for j in jobs]
    bases, rows, programs = {}, [[0] * ROW_FIELDS for _ in jobs], 0
    for name, field in PLANE_FIELDS:
        bases[name], offsets = _base_and_offsets([p[name] for p in planes_])
        for row, off in zip(rows, offsets, strict=True):
            row[field] = off
    for row, j in zip(rows, jobs, strict=True):
        row[0], row[1], row[2] = programs, j.first_chunk, j.out.numel()
        row[9] = j.stream.table_freq.numel()
        programs += n_chunks(j.out.numel(), chunk_size) - j.first_chunk
    table = torch.tensor(rows, dtype=torch.int64)
    if dev.type == "cuda":  # pinned: the copy is queued on the current stream, not waited for
        table = table.pin_memory().to(dev, non_blocking=True)
    return table, bases, programs
