"""Fine-tune SmolLM2-135M on tinyshakespeare with compressed weights, under a memory budget.

    python examples/finetune.py                         # CPU here; CUDA where present
    python examples/finetune.py --steps 60 --budget 0.5 --optimizer adamw --lr 1e-4

Every weight is stored lossless-compressed; the device holds only the working set (the
budget is a fraction of the bf16 model). Each weight is updated the moment its gradient exists
(nzo.optim fuses the optimizer into backward) and re-encoded; the loss printed every few steps
falls. At the end the trained weights are saved as a compressed checkpoint (--save DIR).

The text is tinyshakespeare (--text FILE, else $NEUZIP_TEXT, ../shared/data/tinyshakespeare.txt
or the 40 kB excerpt in tests/data, which a fresh clone has): one that is shorter than the
steps need is read again from its start.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import neuzip_offload as nzo
from neuzip_offload import bundled, evaluate


def training_tokens(tok, args: argparse.Namespace) -> torch.Tensor:
    """The tokens the steps read, in order: the text's first ones, the text repeated if short."""
    path = Path(args.text) if args.text else evaluate.text_path()
    need = args.steps * args.batch * args.seq + 1
    ids = evaluate.token_ids(tok, need, path)
    if ids.numel() >= need:
        print(f"text: {path}, its first {need:,} tokens")
        return ids
    times = math.ceil(need / ids.numel())
    print(
        f"text: {path}, {ids.numel():,} tokens; {args.steps} steps of {args.batch} x {args.seq} "
        f"need {need:,}, so it is read {times} times"
    )
    return ids.repeat(times)[:need]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.5, help="fraction of the bf16 size")
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--save", default=None, help="write the trained model here")
    ap.add_argument("--text", default=None, help="a text file to train on (default above)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = bundled.load_smollm2(torch.bfloat16).train()
    tok = bundled.load_smollm2_tokenizer()
    ids = training_tokens(tok, args)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = (
        nzo.optim.AdamW(lr=args.lr, weight_decay=0.0)
        if args.optimizer == "adamw"
        else nzo.optim.SGD(lr=args.lr * 100, momentum=0.9)
    )
    model = nzo.dispatch(
        model,
        max_gpu_mem=int(args.budget * size),
        trainable=True,
        optimizer=opt,
        grad_accum_steps=args.grad_accum,
    )
    print(model.neuzip.plan, "\n")
    print(
        f"model {size / 1e6:.0f} MB bf16, budget {args.budget * size / 1e6:.0f} MB; "
        f"{args.steps} steps of {args.batch} x {args.seq} tokens, {opt}"
    )
    losses = []
    t0 = time.perf_counter()
    per_step = args.batch * args.seq
    for step in range(args.steps):
        chunk = ids[step * per_step : (step + 1) * per_step + 1]
        x = chunk[:-1].view(args.batch, args.seq)
        loss = model(x, labels=x).loss / args.grad_accum
        loss.backward()
        value = loss.item() * args.grad_accum
        losses.append(value)
        if step % 5 == 0 or step == args.steps - 1:
            held = model.neuzip.stats["peak_held_bytes"] / 1e6
            print(
                f"step {step:3d}  loss {value:.3f}  ({time.perf_counter() - t0:.0f} s, "
                f"peak held {held:.0f} MB)",
                flush=True,
            )
    k = min(5, len(losses))
    early, late = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(
        f"\nmean loss of the first {k} steps {early:.3f} -> last {k} steps {late:.3f} "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    if args.save:
        nzo.save_compressed(model, args.save)
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
