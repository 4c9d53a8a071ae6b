"""Issue 8's runtime figures on the CPU: host synchronizations per block, the accounted peak
against max_gpu_mem, and what stays alive over many tokens.

    python benchmarks/runtime_check.py                 # SmolLM2-135M, budget 40% of bf16 size
    python benchmarks/runtime_check.py --tokens 200 --budget 0.4

The GPU's data path is simulated on the CPU: plans are made with copies (pinned host ->
staging on the copy stream -> slot on the decode stream, setup copies of resident blocks), and
everything runs under the stream-order checker (neuzip_offload/streamcheck.py), which raises on
any unordered buffer access and counts host synchronizations per block. The accounted peak is
the executor's accountant: what a GPU run's torch.cuda.max_memory_allocated() is held to
(benchmarks/gpu_check.py measures that one on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import platform
import time

import torch

import neuzip_offload as nzo
import neuzip_offload.planning as planning
from neuzip_offload import backend, bundled


def _with_copies() -> None:
    """Plans as on CUDA: blocks are copied to staging and decoded into slots (CPU stand-ins)."""
    make = planning.plan_options

    def with_copies(*args, **kwargs):
        return dataclasses.replace(make(*args, **kwargs), copies=True)

    planning.plan_options = with_copies


def _alive_tensors() -> int:
    gc.collect()
    return sum(type(o) is torch.Tensor for o in gc.get_objects())


def _syncs_per_block(chk, ex) -> tuple[int, int]:
    """(host synchronizations inside blocks, blocks entered) since the checker started."""
    inside = sum(n for block, n in chk.syncs_per_block().items() if block is not None)
    entered = sum(1 for ev in ex.events if ev[0] == "enter")
    return inside, entered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.4, help="fraction of the bf16 size")
    ap.add_argument("--tokens", type=int, default=200, help="tokens generated in all")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = bundled.load_smollm2(torch.bfloat16)
    tok = bundled.load_smollm2_tokenizer()
    size = sum(p.numel() * p.element_size() for p in base.parameters())
    budget = int(args.budget * size)
    _with_copies()
    prompt = tok("The quick brown fox", return_tensors="pt").input_ids
    gen = dict(do_sample=False, pad_token_id=tok.eos_token_id or 0)
    rows = []

    # -- inference: dispatch + a 64-token generate under the checker ---------------------------
    t0 = time.perf_counter()
    with backend.checking() as chk:
        model = nzo.dispatch(copy.deepcopy(base), max_gpu_mem=budget, progress=False)
        ex = model.neuzip.executor
        model.generate(prompt, max_new_tokens=64, **gen)
        inside, entered = _syncs_per_block(chk, ex)
    rows.append(
        (
            "inference: host synchronizations per block (checking mode, 64 tokens)",
            f"{inside / max(entered, 1):.3f}",
            f"{inside} in {entered} block entries; 0 stream-order errors; goal 0",
        )
    )
    rows.append(
        (
            "inference: accounted peak / max_gpu_mem (dispatch + 64-token generate)",
            f"{ex.accountant.peak / budget:.3f}",
            f"{ex.accountant.peak} of {budget} bytes; tiers "
            f"{dict((t, model.neuzip.plan.tiers.count(t)) for t in set(model.neuzip.plan.tiers))}"
            "; goal <= 1.0",
        )
    )
    outside = sum(ct.nbytes for ct in model.neuzip.compressed.values() if ct.device.type != "meta")
    rows.append(
        (
            "compressed bytes held outside the executor (a second copy of the model)",
            f"{outside}",
            f"of {sum(ct.nbytes for ct in model.neuzip.compressed.values())} compressed; goal 0",
        )
    )
    # -- runtime objects over many tokens ----------------------------------------------------
    first_tokens = min(50, args.tokens)
    model.generate(prompt, max_new_tokens=first_tokens, **gen)
    alive_first, events_first = _alive_tensors(), len(ex.events)
    left = args.tokens - first_tokens
    out = model.generate(prompt, max_new_tokens=left, min_new_tokens=left, **gen) if left else None
    generated = first_tokens + (0 if out is None else out.shape[1] - prompt.shape[1])
    del out
    alive_last = _alive_tensors()
    rows.append(
        (
            f"live tensors after {first_tokens} and after {generated} generated tokens",
            f"{alive_first} -> {alive_last}",
            f"pending timings {ex.pending_timings()}; event log {events_first} -> {len(ex.events)} "
            f"entries (capped at {nzo.scheduler.executor.LOG_LIMIT}); goal: bounded",
        )
    )
    del model, ex
    gc.collect()

    # -- training: dispatch(trainable) + one step under the checker --------------------------
    ids = tok(bundled_text(), return_tensors="pt").input_ids[:, :64]
    with backend.checking() as chk:

        def trainable(max_gpu_mem: int):
            return nzo.dispatch(
                copy.deepcopy(base).train(),
                max_gpu_mem=max_gpu_mem,
                trainable=True,
                optimizer=nzo.optim.SGD(lr=1e-4),
                progress=False,
            )

        try:
            model, train_budget = trainable(budget), budget
        except nzo.PlanError as e:  # training needs slots for backward too: the minimum
            train_budget = e.minimum_device_bytes
            model = trainable(train_budget)
        ex = model.neuzip.executor
        model(ids, labels=ids).loss.backward()
        inside, entered = _syncs_per_block(chk, ex)
    rows.append(
        (
            "training: accounted peak / max_gpu_mem (dispatch + one step, batch 1 x 64)",
            f"{ex.accountant.peak / train_budget:.3f}",
            f"{ex.accountant.peak} of {train_budget} bytes "
            f"({train_budget / size:.0%} of bf16 size); goal <= 1.0",
        )
    )
    rows.append(
        (
            "training: host synchronizations per block (checking mode, one step)",
            f"{inside / max(entered, 1):.3f}",
            f"{inside} in {entered} block entries (forward and backward)",
        )
    )
    print(
        f"SmolLM2-135M bf16, {size / 1e6:.0f} MB; budget {args.budget:.0%} = {budget} bytes; "
        f"{platform.machine()}, torch {torch.__version__}; "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    print("| measure | value | note |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def bundled_text() -> str:
    from pathlib import Path

    here = Path(__file__).resolve().parents[1] / "tests" / "data" / "tinyshakespeare_head.txt"
    return here.read_text()[:2000]


if __name__ == "__main__":
    main()
