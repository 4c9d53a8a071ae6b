"""Dispatch wall time with and without encoding the blocks a lossless plan keeps decoded.

    python benchmarks/dispatch_time.py                 # SmolLM2-135M, zstd and ans, 2x and 0.6x

Baseline, in the same run: the same dispatch with planning.kept_decoded patched to keep nothing,
which is the path before issue 9 (every weight encoded, resident blocks decoded straight back).
Each configuration runs in its own process (fresh caches), --repeats times; medians printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, sys, time, warnings
    import torch
    import neuzip_offload as nzo
    from neuzip_offload import bundled, planning
    codec, frac, skip = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "skip"
    warnings.simplefilter("ignore")
    if not skip:  # the old path: nothing is kept unencoded
        planning.kept_decoded = lambda *a, **k: {}
    model = bundled.load_smollm2(torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    t = time.perf_counter()
    nzo.dispatch(model, max_gpu_mem=int(frac * size), codec=codec, device="cpu", progress=False)
    seconds = time.perf_counter() - t
    tiers = model.neuzip.plan.tiers
    print(json.dumps({"seconds": seconds, "resident": tiers.count("device"), "blocks": len(tiers)}))
""")


def run(codec: str, frac: float, skip: bool) -> dict:
    out = subprocess.check_output(
        [sys.executable, "-c", CHILD, codec, str(frac), "skip" if skip else "encode-all"],
        text=True,
    )
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--codecs", default="zstd,ans")
    ap.add_argument("--budgets", default="2.0,0.6", help="fractions of the bf16 size")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; SmolLM2-135M bf16, lossless, "
        f"device cpu, median of {args.repeats}\n"
    )
    print("| codec | budget | encode all (before) | skip resident (now) | ratio | resident |")
    print("|---|---|---|---|---|---|")
    for codec in args.codecs.split(","):
        for frac in (float(f) for f in args.budgets.split(",")):
            before = [run(codec, frac, False) for _ in range(args.repeats)]
            now = [run(codec, frac, True) for _ in range(args.repeats)]
            b = statistics.median(r["seconds"] for r in before)
            n = statistics.median(r["seconds"] for r in now)
            print(
                f"| {codec} | {frac:g}x | {b:.1f} s | {n:.1f} s | {n / b:.2f} | "
                f"{now[0]['resident']}/{now[0]['blocks']} |"
            )


if __name__ == "__main__":
    main()
