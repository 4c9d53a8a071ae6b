"""Where Llama-3-70B's blocks go on an 8 GB GPU with 64 GB of host memory — from its config alone.

    python examples/plan_70b.py [--max-gpu-mem 8GB] [--max-cpu-mem 64GB] [--pcie-gbps 25]

Nothing is downloaded or allocated: the model is built on the meta device from the public
dimensions below, and the plans use the bits per weight measured on real weights. The same plan,
with measured sizes, comes from `neuzip-offload plan <compressed checkpoint> --max-gpu-mem 8GB`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import neuzip_offload as nzo
from neuzip_offload import bundled, model_from_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-gpu-mem", default="8GB")
    ap.add_argument("--max-cpu-mem", default="64GB")
    ap.add_argument("--pcie-gbps", type=float, default=25.0)
    ap.add_argument("--disk-gbps", type=float, default=3.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(bundled.LLAMA3_70B_CONFIG))
        t = time.perf_counter()
        model = model_from_config(Path(tmp), torch.bfloat16)
        for label, kw in (
            ("lossless", {}),
            ("lossy k=3", {"mode": "lossy", "mantissa_bits": 3}),
            ("lossy k=1", {"mode": "lossy", "mantissa_bits": 1}),
        ):
            plan = nzo.plan_model(
                model,
                args.max_gpu_mem,
                max_cpu_mem=args.max_cpu_mem,
                pcie_gbps=args.pcie_gbps,
                disk_gbps=args.disk_gbps,
                **kw,
            )
            print(f"=== {label} ===\n{plan}\n")
        print(f"planned in {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
