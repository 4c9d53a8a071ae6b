"""Lossy quality on SmolLM2-135M: perplexity on tinyshakespeare for uniform k and for target_bits.

    python benchmarks/perplexity.py                      # 4096 tokens, windows of 512
    python benchmarks/perplexity.py --tokens 8192 --targets 6.5 7.0

Rows: bf16 (the baseline, same run), uniform k = 0..7 (block 512), and ``target_bits`` with k
chosen per tensor — calibrated on 4096 tokens of the text *after* the evaluated ones, and
uncalibrated (random token ids). Bits per weight count every plane and header.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch

import neuzip_offload as nzo
from neuzip_offload import bundled, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--ks", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--targets", type=float, nargs="+", default=[7.0])
    args = ap.parse_args()
    base = bundled.load_smollm2(torch.bfloat16)
    tok = bundled.load_smollm2_tokenizer()
    ids = evaluate.token_ids(tok, 2 * args.tokens)
    evaluation, calib = ids[: args.tokens], ids[args.tokens :]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"text: {evaluate.text_path().name}, {args.tokens} tokens, windows of {args.window}"
    )
    ref = evaluate.perplexity(base, evaluation, args.window)
    print("\n| weights | bits/weight | perplexity | vs bf16 |\n|---|---|---|---|")
    print(f"| bf16 | 16 | {ref:.3f} | — |", flush=True)

    def row(label: str, **kw) -> None:
        t = time.perf_counter()
        model = nzo.dispatch(
            copy.deepcopy(base), max_gpu_mem="64GB", mode="lossy", reserve=0, progress=False, **kw
        )
        took = time.perf_counter() - t
        ppl = evaluate.perplexity(model, evaluation, args.window)
        print(
            f"| {label} | {model.neuzip.plan.bits_per_weight:.3f} | {ppl:.3f} | "
            f"{100 * (ppl / ref - 1):+.2f}% |",
            flush=True,
        )
        if "target_bits" in kw:
            ks = list(model.neuzip.mantissa_bits.values())
            mix = ", ".join(
                f"{'lossless' if k is None else f'k={k}'}: {ks.count(k)}"
                for k in sorted(set(ks), key=lambda v: 8 if v is None else v)
            )
            print(f"|  (tensors: {mix}; dispatch {took:.0f} s) | | | |", flush=True)

    for k in args.ks:
        row(f"uniform k={k}", mantissa_bits=k, block_size=512)
    for target in args.targets:
        row(
            f"target_bits={target}, calibrated",
            target_bits=target,
            calibration=[calib.view(8, -1)[:, :512]],
        )
        row(f"target_bits={target}, no calibration", target_bits=target)


if __name__ == "__main__":
    main()
