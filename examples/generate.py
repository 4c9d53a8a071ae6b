"""Generate with any Hugging Face causal LM directory, offloaded under a memory budget.

    python examples/generate.py path/to/model --max-gpu-mem 8GB
    python examples/generate.py path/to/model --max-gpu-mem 6GiB --mode lossy --mantissa-bits 3
    DIR=$(python -c "from neuzip_offload import bundled; print(bundled.smollm2_dir())")
    python examples/generate.py $DIR --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \\
        --max-gpu-mem 100MB --check

Nothing is downloaded: the directory must hold the weights (safetensors, or GGUF with --gguf-file).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import neuzip_offload as nzo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a local model directory")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--max-gpu-mem", required=True, help="e.g. 8GB, 6GiB, 512MB or bytes")
    ap.add_argument("--max-cpu-mem", default=None)
    ap.add_argument("--mode", choices=["lossless", "lossy"], default="lossless")
    ap.add_argument("--mantissa-bits", type=int, default=3)
    ap.add_argument("--target-bits", type=float, default=None)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--check", action="store_true", help="compare logits with the plain model")
    args = ap.parse_args()

    kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True, **kw)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, local_files_only=True, **kw
    ).eval()
    ids = tok(args.prompt, return_tensors="pt").input_ids
    ref = None
    if args.check:
        with torch.no_grad():
            ref = model(ids).logits
    model = nzo.dispatch(
        model,
        max_gpu_mem=args.max_gpu_mem,
        max_cpu_mem=args.max_cpu_mem,
        mode=args.mode,
        mantissa_bits=args.mantissa_bits,
        target_bits=args.target_bits,
        prefetch=args.prefetch,
    )
    print(model.neuzip.plan, "\n")
    if ref is not None:
        with torch.no_grad():
            out = model(ids).logits.cpu()
        same = torch.equal(out.view(torch.int16), ref.view(torch.int16))
        print(
            "logits vs plain model:",
            "bit-identical"
            if same
            else f"max |diff| {float((out.float() - ref.float()).abs().max()):.4g}",
        )
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    dt = time.perf_counter() - t
    print(args.prompt + tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    print(f"\n{args.tokens / dt:.2f} tokens/s; stats: {model.neuzip.stats['per_forward']}")


if __name__ == "__main__":
    main()
