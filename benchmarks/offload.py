"""Offloaded inference, side by side in one run: plain, accelerate's offload, ours lossless/lossy.

    python benchmarks/offload.py                       # SmolLM2-135M, budget 40% of bf16 size
    python benchmarks/offload.py --budget 0.4 --tokens 16

Time per token: a greedy decode loop (KV cache) after a 64-token prompt; the median of --tokens
steps. Bytes per token: what is moved to the executing device (accelerate: every offloaded
module's weights, by design) or read compressed and decoded (ours). Peak: the weights' working set
on the executing device (ours: the executor's own accounting, which holds slots and residents).
The scheduler's overhead: our time per token against the plain model's plus the codec's own time
to decode the bytes we decode per token (measured here, same buffers, same pool).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import neuzip_offload as nzo
from neuzip_offload import bundled, evaluate
from neuzip_offload.scheduler.plan import DEVICE


def codec_seconds(model) -> float:
    """The codec alone: decode what one forward decodes, into preallocated buffers."""
    ex = model.neuzip.executor
    blocks = [b for b in ex.blocks() if b.tier != DEVICE]
    cts = [list(b.cts) for b in blocks]
    outs = [[torch.empty(ct.numel, dtype=ct.dtype) for ct in c] for c in cts]
    uses = {i: ex.order.count(b.index) for i, b in enumerate(blocks)}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:

        def once():
            for i in range(len(blocks)):
                for _ in range(uses[i]):
                    nzo.decompress_many(cts[i], outs[i], pool=pool, verify=False)

        once()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            once()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.4, help="fraction of the bf16 size")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    base = bundled.load_smollm2(torch.bfloat16)
    tok = bundled.load_smollm2_tokenizer()
    prompt = evaluate.token_ids(tok, 64)[None]
    size = sum(p.numel() * p.element_size() for p in base.parameters())
    budget = int(size * args.budget)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"SmolLM2-135M bf16 {size / 1e6:.1f} MB; budget {budget / 1e6:.1f} MB "
        f"({args.budget:.0%}); {args.tokens} tokens after a 64-token prompt"
    )
    rows = []

    plain = evaluate.decode_step_seconds(base, prompt, args.tokens)
    rows.append(("plain (fits in RAM)", statistics.median(plain), 0, size))

    from accelerate import cpu_offload

    acc = cpu_offload(copy.deepcopy(base), execution_device=torch.device("cpu"))
    t_acc = evaluate.decode_step_seconds(acc, prompt, args.tokens)
    biggest = max(
        sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        for m in base.modules()
    )
    rows.append(("accelerate cpu_offload", statistics.median(t_acc), size, biggest))
    del acc

    results = {}
    for label, kw in (
        ("ours lossless", {}),
        ("ours lossy k=3", {"mode": "lossy", "mantissa_bits": 3}),
    ):
        model = nzo.dispatch(copy.deepcopy(base), max_gpu_mem=budget, progress=False, **kw)
        evaluate.decode_step_seconds(model, prompt, 2)  # records the order
        before = model.neuzip.stats
        times = evaluate.decode_step_seconds(model, prompt, args.tokens)
        after = model.neuzip.stats
        forwards = after["forwards"] - before["forwards"]
        decoded = (after["decoded_bytes"] - before["decoded_bytes"]) / forwards
        read = sum(
            b.compressed_bytes * b.uses
            for b, t in zip(model.neuzip.plan.blocks, model.neuzip.plan.tiers, strict=True)
            if t != DEVICE
        )
        rows.append(
            (
                f"{label} ({model.neuzip.plan.bits_per_weight:.2f} bits/w)",
                statistics.median(times),
                read,
                after["peak_held_bytes"],
            )
        )
        results[label] = (model, statistics.median(times), decoded)

    print(
        "\n| configuration | ms/token (median) | bytes moved or read per token | peak weight "
        "working set |\n|---|---|---|---|"
    )
    for label, t, moved, peak in rows:
        print(f"| {label} | {t * 1e3:.1f} | {moved / 1e6:.1f} MB | {peak / 1e6:.1f} MB |")

    model, ours, decoded = results["ours lossless"]
    codec = codec_seconds(model)
    p = statistics.median(plain)
    print(
        f"\nscheduler overhead: ours lossless {ours * 1e3:.1f} ms/token vs plain {p * 1e3:.1f} "
        f"+ codec {codec * 1e3:.1f} ms (decoding {decoded / 1e6:.1f} MB per token, "
        f"{decoded / codec / 1e9:.2f} GB/s) = {(p + codec) * 1e3:.1f} ms: "
        f"ratio {ours / (p + codec):.3f} (goal <= 1.2)"
    )
    acc_t = rows[1][1]
    print(
        f"speed-up over accelerate cpu_offload: lossless {acc_t / ours:.2f}x, lossy k=3 "
        f"{acc_t / results['ours lossy k=3'][1]:.2f}x (on the CPU there is no PCIe to save)"
    )


if __name__ == "__main__":
    main()
