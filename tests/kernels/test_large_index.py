"""Triton kernels on tensors whose index arithmetic passes 2**31.

Triton passes an int argument below 2**31 as i32, so a kernel that computes 2 * n, (K + 1) * n or
n * WIDTH in that type wraps for tensors of a few hundred million weights (a 70B embedding piece is
525M). These tests allocate buffers of the real sizes (untouched pages cost no memory; only the
tail is written) and launch only the last programs of the grid (``first_program`` /
``first_chunk``), checking them against the torch reference on the same slice. They skip when the
host has too little free memory for the buffers they allocate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psutil
import pytest
import torch

from neuzip_offload.kernels import ans, ans_triton, planes, planes_triton
from tests.helpers import TRITON_DEVICE, requires_triton, same_bits

pytestmark = requires_triton

EMBED_PIECE = 525_336_576  # half of Llama-3-70B's 128256 x 8192 embedding: 513,024 tiles of 1024
GiB = 1 << 30


def _need(nbytes: int) -> None:
    """Skip unless ``nbytes`` (what the test allocates, touched or not) fit in free memory."""
    if TRITON_DEVICE == "cuda":
        free = torch.cuda.mem_get_info()[0]
        where = "GPU"
    else:
        free = psutil.virtual_memory().available
        where = "host"
    if free < nbytes + GiB:
        pytest.skip(
            f"needs {nbytes / GiB:.1f} GiB (+1 GiB margin) of free {where} memory for its "
            f"buffers, {free / GiB:.1f} GiB available"
        )


def _random_bytes(n: int, seed: int, lo: int = 0, hi: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n,), generator=g, dtype=torch.int32).to(torch.uint8)


def _tail_planes(n: int, k: int, block_size: int, start: int, seed: int):
    """Symbols [n], packed (k+1)-bit field and packed scales, random from element ``start`` on."""
    dev = TRITON_DEVICE
    sym = torch.empty(n, dtype=torch.uint8, device=dev)
    sym[start:] = _random_bytes(n - start, seed, 100, 140).to(dev)  # exponents near 1.0
    field = torch.empty(planes.packed_nbytes(n, k + 1), dtype=torch.uint8, device=dev)
    f0 = start // 8 * (k + 1)
    field[f0:] = _random_bytes(field.numel() - f0, seed + 1).to(dev)
    nb = planes.n_blocks(n, block_size)
    scales = _random_bytes(planes.packed_nbytes(nb, planes.SCALE_BITS), seed + 2).to(dev)
    return sym, field, scales


@pytest.mark.parametrize("k", [4, 6])  # fields of 5 and 7 bits straddle bytes
def test_lossy_merge_tail_of_a_70b_embedding_piece(k):
    """(k + 1) * n passes 2**31: a wrapped field size dropped the high bits of straddling fields."""
    n, block = EMBED_PIECE, 512
    _need(n + planes.packed_nbytes(n, k + 1) + 2 * n)
    start = n - 2 * 1024  # the last two programs
    sym, field, scales = _tail_planes(n, k, block, start, seed=k)
    out = torch.empty(n, dtype=torch.bfloat16, device=TRITON_DEVICE)
    planes_triton.lossy_merge_triton(
        sym, field, scales, k, block, torch.bfloat16, out=out, first_program=start // 1024
    )
    want = planes.lossy_merge(sym[start:], field, scales, k, block, torch.bfloat16, start=start)
    assert same_bits(out[start:], want)


def test_lossy_split_tail_past_2_31_field_bits():
    """8 * n passes 2**31 for k = 7: a wrapped field size kept every field byte unwritten."""
    n, k = (1 << 28) + 2048, 7
    _need(2 * n + n + n)
    start = n - 2 * 1024
    x = torch.empty(n, dtype=torch.bfloat16, device=TRITON_DEVICE)
    g = torch.Generator().manual_seed(7)
    x[start:] = (torch.randn(n - start, generator=g) * 0.03).to(torch.bfloat16).to(x.device)
    # without normalization: packing the scales of all 2**19 blocks would take seconds here
    sym, field, _ = planes_triton.lossy_split_triton(x, k, 512, False, first_program=start // 1024)
    ref_sym, ref_field, _ = planes.lossy_split(x[start:], k, 512, False)
    assert torch.equal(sym[start:], ref_sym)
    assert torch.equal(field[start * (k + 1) // 8 :], ref_field)


def test_pack_tail_past_2_31_bits():
    """n * WIDTH passes 2**31: a wrapped output size kept the pack kernel from storing anything."""
    width = 7
    n = 300_000 * 1024  # 7 * n = 2.15e9 > 2**31 - 1
    _need(n + planes.packed_nbytes(n, width))
    start = n - 2 * 1024
    codes = torch.empty(n, dtype=torch.uint8, device=TRITON_DEVICE)
    codes[start:] = _random_bytes(n - start, 11, 0, 1 << width).to(codes.device)
    out = planes_triton.pack_bits_triton(codes, width, first_program=start // 1024)
    assert torch.equal(out[start * width // 8 :], planes.pack_bits(codes[start:], width))


def test_rans_decode_of_the_last_chunk_of_a_70b_embedding_piece():
    """The fused decoder (prologue tables + decode steps + lossy merge) on the last chunk of a
    525M-weight tensor at k = 4, against the CPU decode and merge of the same chunk."""
    chunk, lanes, pb, k, block = 1 << 16, 32, 12, 4, 512
    n = EMBED_PIECE + 1000  # a ragged last chunk of 1000 symbols
    C = ans.n_chunks(n, chunk)
    base = (C - 1) * chunk
    _need(planes.packed_nbytes(n, k + 1) + 2 * n + C * (4 << pb))
    dev = TRITON_DEVICE
    _, field, scales = _tail_planes(n, k, block, base, seed=5)
    g = torch.Generator().manual_seed(5)
    geometric = (-torch.rand(n - base, generator=g).log2()).floor().clamp(max=60)  # p = 1/2
    tail_sym = (120 + geometric).to(torch.uint8)  # exponent-like symbols
    tail = ans.encode(tail_sym, chunk, lanes, pb)
    # chunks before the last: one-entry tables (12 bits each; C - 1 is even, so the last chunk's
    # entries start on a byte), no words, states never read
    assert (C - 1) * pb % 8 == 0
    stream = ans.AnsStream(
        words=tail.words.to(dev),
        states=torch.cat([torch.zeros((C - 1) * lanes, dtype=torch.int32), tail.states]).to(dev),
        word_offsets=torch.cat([torch.zeros(C - 1, dtype=torch.int32), tail.word_offsets]).to(dev),
        table_lo=torch.cat([torch.zeros(C - 1, dtype=torch.uint8), tail.table_lo]).to(dev),
        table_len=torch.cat([torch.zeros(C - 1, dtype=torch.uint8), tail.table_len]).to(dev),
        table_freq=torch.cat(
            [torch.zeros((C - 1) * pb // 8, dtype=torch.uint8), tail.table_freq]
        ).to(dev),
    )
    out = torch.empty(n, dtype=torch.bfloat16, device=dev)
    status = ans_triton.decode_triton(
        stream,
        field,
        scales,
        out,
        fmt=planes.FMT_LOSSY,
        mantissa_bits=k,
        block_size=block,
        chunk_size=chunk,
        lanes=lanes,
        prob_bits=pb,
        first_chunk=C - 1,
    )
    assert int(status[-1]) == 1
    want = planes.lossy_merge(tail_sym.to(dev), field, scales, k, block, torch.bfloat16, start=base)
    assert same_bits(out[base:], want)


_FP32_SCRIPT = textwrap.dedent(
    """
    import torch
    from neuzip_offload.kernels import planes, planes_triton
    from tests.helpers import TRITON_DEVICE, same_bits

    n = (1 << 30) + 2048  # raw + 2 * n lies past 2**31
    start = n - 2 * 1024
    x = torch.empty(n, dtype=torch.float32, device=TRITON_DEVICE)
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(-(1 << 31), 1 << 31, (n - start,), generator=g, dtype=torch.int64)
    x[start:] = bits.to(torch.int32).view(torch.float32).to(x.device)
    sym, raw = planes_triton.split_triton(x, first_program=start // 1024)
    want_sym, want_raw = planes.split(x[start:])
    assert torch.equal(sym[start:], want_sym), "symbols"
    for p in range(3):  # the three byte planes of raw, each n long
        got = raw[p * n + start : (p + 1) * n]
        assert torch.equal(got, want_raw[p * (n - start) : (p + 1) * (n - start)]), f"plane {p}"
    out = planes_triton.merge_triton(sym, raw, torch.float32, first_program=start // 1024)
    assert same_bits(out[start:], x[start:]), "merge"
    print("fp32 tail ok")
    """
)


def test_fp32_split_and_merge_tail_past_2_31_bytes():
    """fp32 addresses raw + 2 * n: negative (out of bounds) when 2 * n wraps, for n >= 2**30.

    Runs in a child process: the wrapped address faults instead of failing an assertion.
    """
    n = (1 << 30) + 2048
    _need(4 * n + n + 3 * n + 4 * n)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", _FP32_SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert "fp32 tail ok" in done.stdout
