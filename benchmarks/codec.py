"""Codec numbers on real trained weights: bits per weight and CPU throughput, beside baselines.

    python benchmarks/codec.py                   # MiniLM and SmolLM2-135M
    python benchmarks/codec.py --models minilm --repeat 3

Weights: every float tensor of at least two dimensions, cast to bf16. Baselines, measured in the
same run: the global order-0 entropy bound of the exponents (8 raw bits + H), zstd (level 3) on the
raw bf16 bytes, and torch's memcpy (``copy_``) of the decoded bytes. Throughputs are GB/s of bf16
(2 bytes per weight), medians of ``--repeat`` runs; decoding writes into preallocated buffers, as
the runtime does.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zstandard

import neuzip_offload as nzo
from neuzip_offload import bundled
from neuzip_offload.config import CodecConfig
from neuzip_offload.kernels import planes


def load(name: str) -> dict[str, torch.Tensor]:
    if name == "minilm":
        return bundled.matrices(bundled.minilm_state_dict())
    model = bundled.load_smollm2(torch.bfloat16)
    return bundled.matrices({k: v.detach() for k, v in model.state_dict().items()})


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def order0_bound(tensors: list[torch.Tensor]) -> float:
    hist = torch.zeros(256, dtype=torch.float64)
    n = 0
    for t in tensors:
        sym, _ = planes.split(t)
        hist += torch.bincount(sym.to(torch.int64), minlength=256).double()
        n += t.numel()
    p = hist[hist > 0] / n
    return 8.0 - float((p * p.log2()).sum())


def zstd_raw_bits(tensors: list[torch.Tensor]) -> float:
    c = zstandard.ZstdCompressor(level=3)
    total = sum(len(c.compress(t.contiguous().view(torch.uint8).numpy())) for t in tensors)
    return 8 * total / sum(t.numel() for t in tensors)


def bits(cts) -> float:
    return 8 * sum(c.nbytes for c in cts) / sum(c.numel for c in cts)


def run(name: str, repeat: int, pool: ThreadPoolExecutor) -> list[tuple]:
    tensors = list(load(name).values())
    n = sum(t.numel() for t in tensors)
    gb = 2 * n / 1e9
    rows = []
    bound = order0_bound(tensors)
    raw_zstd = zstd_raw_bits(tensors)
    cfg = {
        "ans": CodecConfig(codec="ans"),
        "zstd": CodecConfig(codec="zstd"),
        "ans lossy k=3": CodecConfig(codec="ans", mode="lossy", mantissa_bits=3, block_size=512),
        "zstd lossy k=3": CodecConfig(codec="zstd", mode="lossy", mantissa_bits=3, block_size=512),
    }
    cts = {k: nzo.compress_many(tensors, c, pool=pool) for k, c in cfg.items()}
    for k in ("ans", "zstd"):
        outs = nzo.decompress_many(cts[k], pool=pool, verify=False)
        assert all(
            torch.equal(a.view(torch.int16), b.view(torch.int16))
            for a, b in zip(tensors, outs, strict=True)
        ), f"{k} is not lossless"
    rows.append((name, "lossless ans, bits/weight", bits(cts["ans"]), "order-0 bound", bound))
    rows.append(
        (name, "lossless zstd, bits/weight", bits(cts["zstd"]), "zstd-3 raw bf16", raw_zstd)
    )
    rows.append(
        (
            name,
            "lossy k=3 b=512 ans, bits/weight",
            bits(cts["ans lossy k=3"]),
            "order-0 bound",
            bound,
        )
    )
    rows.append(
        (
            name,
            "lossy k=3 b=512 zstd, bits/weight",
            bits(cts["zstd lossy k=3"]),
            "order-0 bound",
            bound,
        )
    )

    outs = [torch.empty_like(t) for t in tensors]
    src = [t.clone() for t in tensors]
    memcpy = median_time(lambda: [o.copy_(s) for o, s in zip(outs, src, strict=True)], repeat)
    for k, label in (
        ("zstd", "CPU decode zstd"),
        ("ans", "CPU decode ans"),
        ("zstd lossy k=3", "CPU decode zstd lossy k=3"),
    ):
        dt = median_time(
            lambda k=k: nzo.decompress_many(cts[k], outs, pool=pool, verify=False), repeat
        )
        rows.append((name, f"{label}, GB/s", gb / dt, "memcpy GB/s", gb / memcpy))
    for k in ("zstd", "ans"):
        dt = median_time(lambda k=k: nzo.compress_many(tensors, cfg[k], pool=pool), repeat)
        rows.append((name, f"CPU encode {k}, GB/s", gb / dt, "memcpy GB/s", gb / memcpy))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print("| model | measure | ours | baseline | baseline value | ratio |")
    print("|---|---|---|---|---|---|")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for name in args.models:
            for model, what, ours, base, value in run(name, args.repeat, pool):
                print(
                    f"| {model} | {what} | {ours:.4f} | {base} | {value:.4f} | "
                    f"{ours / value:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
