"""Training memory: a step with compressed weights against the same fused optimizer uncompressed.

    python benchmarks/training.py                  # SmolLM2-135M, CPU, the smallest budget

Both sides fuse the optimizer into backward (LOMO-style: each tensor is updated as soon as its
gradient exists, so one gradient lives at a time). The baseline keeps every weight decoded (bf16);
ours keeps them lossless-compressed, decoding into the executor's slots. Each configuration runs
in its own process; two measures, median of the steps after a warm-up:

- accounted: bytes holding weights (ours: compressed host blocks + the executor's device
  working set — residents, slots, workspace) + optimizer state + the largest gradient;
- measured: peak RSS during a step, minus the RSS of the process before the model was loaded
  (so activations, allocator slack and everything else are in it, on both sides).

Batch 1 x 64 tokens, so that weights, not activations, dominate (as in NeuZip's 8B runs).
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
    import json, sys, threading, time, gc
    import psutil, torch
    import neuzip_offload as nzo
    from neuzip_offload import bundled, evaluate
    config, budget_frac, opt_name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    steps = int(sys.argv[4])
    proc = psutil.Process()
    tok = bundled.load_smollm2_tokenizer()
    ids = evaluate.token_ids(tok, steps * 64 + 1)
    gc.collect()
    base_rss = proc.memory_info().rss
    model = bundled.load_smollm2(torch.bfloat16).train()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    opt = (nzo.optim.SGD(lr=1e-3) if opt_name == "sgd" else nzo.optim.AdamW(lr=1e-4))
    if config == "ours":  # the smallest working set: single matrices, one block ahead
        kw = dict(trainable=True, optimizer=opt, progress=False, reserve=0, prefetch=1,
                  granularity="linear")
        budget = int(budget_frac * size)
        if budget_frac <= 0:  # the planner's minimum
            try:
                nzo.dispatch(model, max_gpu_mem=1, **kw)
            except nzo.PlanError as e:
                budget = e.minimum_device_bytes
        model = nzo.dispatch(model, max_gpu_mem=budget, **kw)
    else:  # the same fused optimizer on plain weights
        for name, p in model.named_parameters():
            def hook(t, name=name):
                g, t.grad = t.grad, None
                opt.update(name, t.data, g)
            p.register_post_accumulate_grad_hook(hook)
    gc.collect()
    peaks, secs = [], []
    for step in range(steps):
        x = ids[step * 64 : step * 64 + 64][None]
        peak = [proc.memory_info().rss]
        stop = threading.Event()
        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.001)
        t = threading.Thread(target=watch); t.start()
        t0 = time.perf_counter()
        model(x, labels=x).loss.backward()
        secs.append(time.perf_counter() - t0)
        stop.set(); t.join()
        peaks.append(peak[0] - base_rss)
    state = opt.state_bytes()
    if config == "ours":
        host = sum(ct.nbytes for k, ct in model.neuzip.compressed.items()
                   if model.neuzip.executor.tier_of(k) != "device")
        weights = host + model.neuzip.stats["peak_held_bytes"]
    else:
        weights = size
    print(json.dumps({"weights": weights, "state": state, "largest_grad": largest,
                      "accounted": weights + state + largest, "measured": peaks[1:],
                      "seconds": secs[1:],
                      "size": size}))
""")


def run(config: str, budget: float, opt: str, steps: int) -> dict:
    out = subprocess.check_output(
        [sys.executable, "-c", CHILD, config, str(budget), opt, str(steps)],
        stderr=subprocess.DEVNULL,
    )
    return json.loads(out.decode().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="fraction of the bf16 size (0: the planner's minimum)",
    )
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    budget = "the planner's minimum" if args.budget <= 0 else f"{args.budget:.0%} of its size"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; SmolLM2-135M bf16, "
        f"budget {budget}, "
        f"batch 1 x 64 tokens, {args.steps} steps (the first one a warm-up)"
    )
    print("\n| optimizer | measure | fused, uncompressed | ours | ratio |\n|---|---|---|---|---|")
    for opt in ("sgd", "adamw"):
        base = run("plain", args.budget, opt, args.steps)
        ours = run("ours", args.budget, opt, args.steps)
        for label, a, b in (
            ("accounted MB (weights + state + 1 grad)", base["accounted"], ours["accounted"]),
            (
                "measured peak RSS MB (median step)",
                statistics.median(base["measured"]),
                statistics.median(ours["measured"]),
            ),
        ):
            print(f"| {opt} | {label} | {a / 1e6:.1f} | {b / 1e6:.1f} | {b / a:.3f} |", flush=True)
        a, b = statistics.median(base["seconds"]), statistics.median(ours["seconds"])
        print(f"| {opt} | s/step (median) | {a:.3f} | {b:.3f} | {b / a:.3f} |", flush=True)


if __name__ == "__main__":
    main()
