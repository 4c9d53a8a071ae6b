"""Compile every Triton kernel the codec launches for real GPUs (sm_80/86/89/90), without a GPU.

    python benchmarks/compile_kernels.py                          # production settings
    python benchmarks/compile_kernels.py --tests tests/kernels    # plus the launches of tests
    python benchmarks/compile_kernels.py --triton-path /tmp/t36   # compile with another Triton:
        pip install --target /tmp/t36 triton==3.6.0 --no-deps     #   (what torch 2.11 pins)

The launches are recorded under Triton's interpreter (TRITON_INTERPRET=1, set here before Triton
is imported when no GPU is present) by driving the codec's own Triton paths on small CPU tensors
at the production settings (chunk 65536, 32 lanes, 12 probability bits, block 512; bf16, fp16,
fp32; lossless, lossy k = 0..7 with and without normalization; the device encoder). Each unique
specialization is then compiled by kernels/aot.py in a fresh cache. Prints one row per kernel:
specializations, per-architecture result, most registers, most spill bytes (ptxas -v).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from neuzip_offload.kernels import aot

log = logging.getLogger("compile_kernels")

# Kernels on the decode path: a spill there costs every forward pass.
DECODE_PATH = ("_decode_kernel", "_merge_kernel")


def production_cases() -> list[tuple[torch.dtype, dict]]:
    """(input dtype, CodecConfig fields) at the production defaults."""
    cases: list[tuple[torch.dtype, dict]] = [
        (dtype, {"mode": "lossless"}) for dtype in (torch.bfloat16, torch.float16, torch.float32)
    ]
    for normalize in (True, False):
        cases += [
            (torch.bfloat16, {"mode": "lossy", "mantissa_bits": k, "normalize": normalize})
            for k in range(8)
        ]
        cases += [
            (dtype, {"mode": "lossy", "mantissa_bits": 3, "normalize": normalize})
            for dtype in (torch.float16, torch.float32)
        ]
    return cases


def drive_production_defaults(
    n: int = 1024, device: str | None = None, lanes: int | None = None
) -> list[str]:
    """Run the codec's Triton launchers at the production settings; returns what failed.

    Compression takes the GPU path (Triton split and, once per rANS setting, the Triton
    encoder: its 2048-step loop costs ~3 s in the interpreter, and its specialization does not
    depend on the mode); decoding goes through ``decode_into(..., use_triton=True)`` for rANS
    (LUT + fused decode kernels) and zstd (merge kernels), and, once (its loop over a whole
    segment costs seconds in the interpreter; its specialization does not depend on the mode),
    the planes' device CRC. ``n`` (a multiple of 16, as real weights are) keeps the interpreter
    quick; launch specializations do not depend on it beyond its divisibility. ``lanes`` replaces
    the default rANS lanes (CodecConfig checks it).
    """
    from neuzip_offload import codec
    from neuzip_offload import compressed as fmt
    from neuzip_offload.config import CodecConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    failures: list[str] = []
    encoded: set[tuple[int, int, int]] = set()
    checksummed = False
    extra = {} if lanes is None else {"lanes": lanes}
    gen = torch.Generator().manual_seed(0)
    original: Callable = codec._use_triton
    try:
        for dtype, fields in production_cases():
            for codec_name in ("ans", "zstd"):
                cfg = CodecConfig(codec=codec_name, **fields, **extra)
                label = f"{dtype} {codec_name} {fields}"
                setting = (cfg.resolved_chunk_size, cfg.lanes, cfg.prob_bits)
                # The rANS encoder runs on the device path once per setting; the other cases
                # encode on the host (symbols are uint8; the float input takes the Triton split).
                device_encode = codec_name == "ans" and setting not in encoded
                codec._use_triton = (  # type: ignore[assignment]
                    (lambda t: True) if device_encode else (lambda t: t.dtype != torch.uint8)
                )
                x = (torch.randn(n, generator=gen) * 0.05).to(dtype).to(device)
                try:
                    ct = codec.compress(x, config=cfg)
                    encoded |= {setting} if device_encode else set()
                    out = torch.empty(n, dtype=dtype, device=device)
                    status = codec.decode_into(ct, out, use_triton=True)
                    if status is not None and not bool(status.all()):
                        failures.append(f"{label}: a chunk did not decode")
                    if not checksummed:  # the planes' CRC on the device
                        checksummed = True
                        fmt.planes_crc_tensor(ct.planes, use_triton=True)
                except Exception as e:  # a broken kernel: recorded already; reported here
                    failures.append(f"{label}: {type(e).__name__}: {e}")
    finally:
        codec._use_triton = original  # type: ignore[assignment]
    return failures


def print_table(report: aot.CompileReport) -> None:
    rows = aot.report_rows(report)
    if not rows:
        print("no specializations recorded")
        return
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("| " + " | ".join(c.ljust(width[c]) for c in cols) + " |")
    print("|" + "|".join("-" * (width[c] + 2) for c in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]).ljust(width[c]) for c in cols) + " |")
    print(
        f"\ntriton {report.triton_version}: {len(report.results)} compiles, "
        f"{len(report.failures())} failed, {report.seconds:.1f} s"
    )
    seen = set()
    for r in report.failures():
        key = (r.spec.name, r.error.splitlines()[0] if r.error else "")
        if key not in seen:
            seen.add(key)
            print(f"  FAILED {r.spec.name} sm_{r.arch}: {r.error}")
    for r in report.spilling(DECODE_PATH):
        print(f"  SPILLS {r.spec.name} sm_{r.arch}: {r.spills} B, {r.registers} registers")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", type=int, nargs="+", default=list(aot.ARCHS))
    p.add_argument(
        "--triton-path",
        action="append",
        default=[],
        help="put this directory first on the compile workers' PYTHONPATH (another Triton)",
    )
    p.add_argument("--python", default=sys.executable, help="the compile workers' interpreter")
    p.add_argument("--tests", nargs="*", default=[], help="also record the launches of tests")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n", type=int, default=1024, help="elements per driven tensor")
    p.add_argument("--lanes", type=int, help="rANS lanes of the driven settings (default: 32)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    recorder = aot.LaunchRecorder().install()
    failures = drive_production_defaults(args.n, lanes=args.lanes)
    if args.tests:
        import pytest

        # the compile test itself would compile everything again
        pytest.main(["-q", "-p", "no:cacheprovider", "--ignore-glob=*test_compile.py", *args.tests])
    recorder.uninstall()
    for f in failures:
        print(f"launch failed: {f}")
    for e in recorder.errors:
        print(f"not recorded: {e}")
    specs = recorder.specs()
    print(f"{recorder.launches} launches, {len(specs)} unique specializations")
    report = aot.compile_specs(
        specs, args.archs, python_path=args.triton_path, python=args.python, workers=args.workers
    )
    print_table(report)
    return 1 if report.failures() or report.spilling(DECODE_PATH) else 0


if __name__ == "__main__":
    raise SystemExit(main())
