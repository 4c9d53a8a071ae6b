"""Checkpoint numbers: conversion throughput, disk-tier against host-tier forwards, the 70B plan.

    python benchmarks/checkpoint.py

1. Conversion to the ans format: SmolLM2-135M exported as 4 safetensors shards (bf16), converted
   with 1 and with 2 worker processes; GB of bf16 in per second, median of 3.
2. Disk tier: the checkpoint converted with zstd (the CPU's coder; ans is the GPU's) loaded
   twice under the same device budget (40% of bf16),
   once with host memory for everything (host tier), once with a third of it (the rest read from
   the shards by the background reader; the page cache is warm after the first pass). Time per
   decode step (KV cache, after a 64-token prompt), median of 16; their ratio.
3. The Llama-3-70B plan from its public config alone, at 8 GB GPU / 64 GB host.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import neuzip_offload as nzo
from neuzip_offload import bundled, evaluate
from neuzip_offload.checkpoint import Checkpoint


def main() -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="nzbench-"))
    try:
        base = bundled.load_smollm2(torch.bfloat16)
        tok = bundled.load_smollm2_tokenizer()
        bundled.export_safetensors(base, work / "hf", max_shard_bytes=70_000_000)
        src_bytes = sum(p.stat().st_size for p in (work / "hf").glob("*.safetensors"))
        print(
            f"\n1. conversion of {src_bytes / 1e6:.0f} MB in "
            f"{len(list((work / 'hf').glob('*.safetensors')))} shards to ans"
        )
        print("| workers | seconds (median of 3) | GB/s of bf16 in |\n|---|---|---|")
        for workers in (1, 2):
            times = []
            for _ in range(3):
                shutil.rmtree(work / "nz", ignore_errors=True)
                t = time.perf_counter()
                nzo.convert(work / "hf", work / "nz", workers=workers, progress=False)
                times.append(time.perf_counter() - t)
            dt = statistics.median(times)
            print(f"| {workers} | {dt:.2f} | {src_bytes / dt / 1e9:.3f} |", flush=True)

        size = sum(p.numel() * p.element_size() for p in base.parameters())
        nzo.convert(work / "hf", work / "nzz", codec="zstd", progress=False)
        compressed = Checkpoint(work / "nzz").compressed_bytes()
        prompt = evaluate.token_ids(tok, 64)[None]
        print(
            f"\n2. load() of the zstd checkpoint, device budget {0.4 * size / 1e6:.0f} MB "
            "(40% of bf16), CPU"
        )
        print("| tiers | ms/step (median of 16) | read from disk per step | misses per step |")
        print("|---|---|---|---|")
        results = {}
        for label, host in (("host", 10 * compressed), ("disk", compressed // 3)):
            model = nzo.load(
                work / "nzz", max_gpu_mem=int(0.4 * size), max_cpu_mem=host, progress=False
            )
            evaluate.decode_step_seconds(
                model, prompt, 4
            )  # warm: order recorded, page cache filled
            before = model.neuzip.stats
            times = evaluate.decode_step_seconds(model, prompt, 16)
            after = model.neuzip.stats
            steps = after["forwards"] - before["forwards"]
            read = (
                after["per_forward"]["read_bytes"] * after["forwards"]
                - before["per_forward"]["read_bytes"] * before["forwards"]
            ) / steps
            misses = (after["misses"] - before["misses"]) / steps
            tiers = model.neuzip.plan.tiers
            counts = ", ".join(f"{tiers.count(t)} {t}" for t in dict.fromkeys(tiers))
            results[label] = statistics.median(times)
            print(
                f"| {label} ({counts}) | {results[label] * 1e3:.1f} | {read / 1e6:.1f} MB | "
                f"{misses:.2f} |",
                flush=True,
            )
            nzo.undispatch(model)
        print(f"disk / host: {results['disk'] / results['host']:.3f} (goal <= 1.3)")

        (work / "l70").mkdir()
        (work / "l70" / "config.json").write_text(json.dumps(bundled.LLAMA3_70B_CONFIG))
        from neuzip_offload import model_from_config

        t = time.perf_counter()
        model = model_from_config(work / "l70", torch.bfloat16)
        print("\n3. Llama-3-70B from its config, 8 GB GPU, 64 GB host, PCIe 25 GB/s, disk 3 GB/s")
        print(
            "| mode | stored GB | bits/weight | host GB | disk GB | GB/token PCIe | GB/token disk "
            "| s/token lower bound |\n|---|---|---|---|---|---|---|---|"
        )
        for label, kw in (
            ("lossless", {}),
            ("lossy k=3", {"mode": "lossy", "mantissa_bits": 3}),
            ("lossy k=1", {"mode": "lossy", "mantissa_bits": 1}),
        ):
            p = nzo.plan_model(model, "8GB", max_cpu_mem="64GB", **kw)
            print(
                f"| {label} | {p.stored_bytes / 1e9:.1f} | {p.bits_per_weight:.2f} | "
                f"{p.host_bytes / 1e9:.1f} | {p.disk_bytes / 1e9:.1f} | "
                f"{p.pcie_bytes_per_forward / 1e9:.1f} | {p.disk_bytes_per_forward / 1e9:.1f} | "
                f"{p.seconds_lower_bound():.2f} |"
            )
        print(
            f"(three plans in {time.perf_counter() - t:.2f} s, model built on meta included; "
            "bits/weight estimated: raw bits + 2.65 coded exponent bits, as measured on "
            "MiniLM/SmolLM2)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
