"""The GPU check, for a lent GPU: compiled Triton kernels against the CPU references, then timings.

Prepare here (CPU): real weights and the wheels the GPU machine lacks go to .gpu/ (git-ignored):

    python benchmarks/gpu_check.py --prepare .gpu

then run there in one call (the device tool, carrying .gpu):

    pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl &&
    export PYTHONPATH=/tmp/site && pip install -q --no-deps --no-build-isolation -e . &&
    python benchmarks/gpu_check.py --data .gpu

Prints one table: each check (ok / FAILED, with the largest difference) and each timing (GB/s of
bf16 output, median of CUDA-event timings) beside the card's own device-to-device copy GB/s
measured in the same run. Every section runs even if an earlier one fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import torch

ROWS: list[tuple[str, str, str]] = []


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"| {what} | {value} | {note} |", flush=True)


def section(fn):
    def run(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception as e:  # a broken section is reported, the rest still runs
            row(fn.__name__, "FAILED", f"{type(e).__name__}: {e}")
            traceback.print_exc()

    return run


def prepare(out: Path) -> None:
    """Real weights (a few MiniLM matrices, bf16) and the wheels the GPU machine lacks."""
    from safetensors.torch import save_file

    from neuzip_offload import bundled

    out.mkdir(parents=True, exist_ok=True)
    mats = bundled.matrices(bundled.minilm_state_dict())
    keep = {k: v.contiguous() for k, v in list(mats.items())[:12]}
    save_file(keep, str(out / "minilm_part.safetensors"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux2014_x86_64",
            "-d",
            str(out / "wheels"),
            "zstandard",
        ],
        check=True,
    )
    print(f"prepared {out}: {sum(v.numel() for v in keep.values())} real weights + wheels")


def cuda_time(fn, repeat: int = 20) -> float:
    """Median seconds of ``fn`` on the current stream (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def real_weights(data: Path | None) -> dict[str, torch.Tensor]:
    if data is not None and (data / "minilm_part.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(data / "minilm_part.safetensors"))
    g = torch.Generator().manual_seed(0)
    return {"synthetic": (torch.randn(1024, 1024, generator=g) * 0.02).to(torch.bfloat16)}


@section
def check_planes(dev: str) -> None:
    from neuzip_offload.kernels import planes

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ints = torch.int32 if dtype == torch.float32 else torch.int16
        x = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64).to(ints)
        x = x.view(dtype)
        sym, raw = planes.split(x)
        tsym, traw = planes.split_triton(x.to(dev))
        merged = planes.merge_triton(sym.to(dev), raw.to(dev), dtype).cpu()
        ok = torch.equal(sym, tsym.cpu()) and torch.equal(raw, traw.cpu())
        ok = ok and torch.equal(merged.view(ints), x.view(ints))
        row(f"split/merge {dtype} (1M random patterns)", "ok" if ok else "FAILED")
    for k in (0, 3, 7):
        x = (torch.randn(1 << 20, generator=g) * 0.02).to(torch.bfloat16)
        ref = planes.lossy_split(x, k, 512, True)
        got = planes.lossy_split_triton(x.to(dev), k, 512, True)
        same = all(torch.equal(a, b.cpu()) for a, b in zip(ref, got, strict=True))
        y_ref = planes.lossy_merge(*ref, k, 512, torch.bfloat16)
        y_tri = planes.lossy_merge_triton(*(t.to(dev) for t in ref), k, 512, torch.bfloat16)
        same = same and torch.equal(y_ref.view(torch.int16), y_tri.cpu().view(torch.int16))
        row(f"lossy split/merge k={k}", "ok" if same else "FAILED")


@section
def check_ans(dev: str, data: Path | None) -> None:
    import neuzip_offload as nzo
    from neuzip_offload.codec import decode_into
    from neuzip_offload.config import CodecConfig

    tensors = real_weights(data)
    for mode in ("lossless", "lossy"):
        cfg = CodecConfig(codec="ans", mode=mode, mantissa_bits=3)
        cts = nzo.compress_many(list(tensors.values()), cfg, names=list(tensors))
        bad = []
        for ct in cts:
            ref = nzo.decompress(ct).reshape(-1)
            g = ct.to(dev)
            out = torch.empty(ct.numel, dtype=ct.dtype, device=dev)
            status = decode_into(g, out)
            if not bool(status.all()) or not torch.equal(
                out.cpu().view(torch.int16), ref.view(torch.int16)
            ):
                bad.append(ct.name)
        row(
            f"rANS Triton decode, {mode}, {len(cts)} real tensors",
            "ok" if not bad else "FAILED",
            ", ".join(bad),
        )
        # the Triton encoder (compress on the GPU) writes the host encoder's bytes
        on_gpu = [nzo.compress(t.to(dev), config=cfg, name=k).cpu() for k, t in tensors.items()]
        bad = [
            a.name
            for a, b in zip(cts, on_gpu, strict=True)
            if a.header != b.header
            or any(not torch.equal(p, b.planes[k]) for k, p in a.planes.items())
        ]
        row(
            f"rANS Triton encode, {mode}, {len(cts)} real tensors",
            "ok" if not bad else "FAILED",
            ", ".join(bad),
        )


@section
def time_decode(dev: str) -> None:
    import neuzip_offload as nzo
    from neuzip_offload.codec import decode_into
    from neuzip_offload.config import CodecConfig

    g = torch.Generator().manual_seed(0)
    rows, cols = 8192, 8192
    x = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    src = x.to(dev)
    dst = torch.empty_like(src)
    copy = cuda_time(lambda: dst.copy_(src))
    gb = 2 * x.numel() / 1e9
    row("device-to-device copy, GB/s", f"{gb / copy:.0f}", f"{torch.cuda.get_device_name()}")
    for mode, k in (("lossless", 0), ("lossy", 3)):
        ct = nzo.compress(x, config=CodecConfig(codec="ans", mode=mode, mantissa_bits=k)).to(dev)
        out = torch.empty(x.numel(), dtype=torch.bfloat16, device=dev)
        ws = torch.empty(ct.header.n_chunks << ct.header.prob_bits, dtype=torch.int32, device=dev)
        t = cuda_time(lambda ct=ct, out=out, ws=ws: decode_into(ct, out, workspace=ws))
        note = f"{copy / t:.2f}x of copy; {ct.bits_per_weight:.3f} bits/weight"
        row(f"rANS Triton decode {mode}, 67M weights, GB/s", f"{gb / t:.0f}", note)


@section
def time_encode(dev: str) -> None:
    """compress() on the GPU, end to end (split, histograms, encoder, compaction, checksum)."""
    import time

    import neuzip_offload as nzo
    from neuzip_offload.config import CodecConfig

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8192, 8192, generator=g) * 0.02).to(torch.bfloat16).to(dev)
    cfg = CodecConfig(codec="ans")
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nzo.compress(x, config=cfg)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times[1:])
    row("rANS compress on the GPU, 67M weights, GB/s", f"{2 * x.numel() / 1e9 / t:.1f}", "")


def _llama_1b():
    """A ~0.85B-parameter Llama, random init (nothing is downloaded), bf16 on the host."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _forward_seconds(model, batch: int, dev: str) -> float:
    """Median time of one decode step (batch x 1 token after a 64-token cache), CUDA events."""
    from transformers import DynamicCache

    from neuzip_offload.evaluate import cache_keyword

    key = cache_keyword(model)
    ids = torch.randint(0, 32000, (batch, 64), device=dev)
    with torch.no_grad():
        cache = DynamicCache()
        model(ids, use_cache=True, **{key: cache})
        step = ids[:, -1:]

        def one():
            model(step, use_cache=True, **{key: cache})
            cache.crop(64)  # back to the 64-token prefix for the next step

        return cuda_time(one, repeat=10)


def _h2d_gbps() -> float:
    src = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    return src.numel() / 1e9 / cuda_time(lambda: dst.copy_(src, non_blocking=True))


@section
def dispatch_1b(dev: str) -> None:
    import neuzip_offload as nzo

    base = _llama_1b()
    size = sum(p.numel() * p.element_size() for p in base.parameters())
    h2d = _h2d_gbps()
    row("pinned host-to-device copy, GB/s", f"{h2d:.1f}", "PCIe, measured")
    ids = torch.randint(0, 32000, (1, 32))
    plain = copy.deepcopy(base).to(dev)
    with torch.no_grad():
        ref = plain(ids.to(dev)).logits.float().cpu()
    t_plain = {b: _forward_seconds(plain, b, dev) for b in (1, 8)}
    del plain
    torch.cuda.empty_cache()
    budget = size // 4
    times = {}
    for label, kw in (("lossless", {}), ("lossy k=3", {"mode": "lossy", "mantissa_bits": 3})):
        torch.cuda.reset_peak_memory_stats()
        model = nzo.dispatch(copy.deepcopy(base), max_gpu_mem=budget, progress=False, **kw)
        with torch.no_grad():
            out = model(ids.to(dev)).logits.float().cpu()
        same = torch.equal(out, ref)
        t = _forward_seconds(model, 1, dev)
        times[label] = t
        bound = model.neuzip.plan.pcie_bytes_per_forward / (h2d * 1e9)
        peak = torch.cuda.max_memory_allocated()
        row(
            f"1B, budget 25%, {label}: s/forward (batch 1)",
            f"{t:.4f}",
            f"PCIe bound {bound:.4f} s: {t / bound:.2f}x; logits "
            f"{'bit-identical' if same else f'max diff {float((out - ref).abs().max()):.3g}'}",
        )
        row(
            f"1B, budget 25%, {label}: peak allocated / budget",
            f"{peak / budget:.3f}",
            f"{peak / 1e9:.2f} GB of {budget / 1e9:.2f} GB",
        )
        nzo.undispatch(model)
        del model
        torch.cuda.empty_cache()
    # accelerate, same budget: its device map and offload hooks (no prefetch, no compression)
    from accelerate import dispatch_model, infer_auto_device_map

    acc = copy.deepcopy(base)
    dmap = infer_auto_device_map(
        acc, max_memory={0: budget, "cpu": 4 * size}, no_split_module_classes=acc._no_split_modules
    )
    acc = dispatch_model(acc, device_map=dmap, main_device=0)
    t_acc = _forward_seconds(acc, 1, dev)
    for label, t in times.items():
        row(
            f"1B, budget 25%: speed-up over accelerate offload, {label}",
            f"{t_acc / t:.2f}x",
            f"accelerate {t_acc:.4f} s/forward",
        )
    del acc
    torch.cuda.empty_cache()
    # the model fits: decode-on-the-fly from device-compressed blocks vs plain bf16, batch 8
    model = nzo.dispatch(copy.deepcopy(base), max_gpu_mem=int(size * 0.9), progress=False)
    tiers = model.neuzip.plan.tiers
    t8 = _forward_seconds(model, 8, dev)
    row(
        "1B fits (90% budget), lossless, batch 8: speed vs bf16",
        f"{t_plain[8] / t8:.2f}x",
        f"tiers {dict((t, tiers.count(t)) for t in set(tiers))}; bf16 {t_plain[8]:.4f} s, "
        f"ours {t8:.4f} s",
    )


def _train_steps(model, dev: str, steps: int = 4) -> list[float]:
    """Seconds per training step (batch 1 x 512 tokens; forward + backward, updates fused)."""
    import time

    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps + 1):
        ids = torch.randint(0, 32000, (1, 512), generator=g).to(dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[1:]


@section
def train_1b(dev: str) -> None:
    """Issue 5's GPU rows: a step with compressed weights against the same fused SGD on plain
    bf16 weights (LOMO-style hooks), time and torch.cuda.max_memory_allocated."""
    import neuzip_offload as nzo

    base = _llama_1b().train()
    size = sum(p.numel() * p.element_size() for p in base.parameters())
    plain = copy.deepcopy(base).to(dev)
    opt = nzo.optim.SGD(lr=1e-4)
    for name, p in plain.named_parameters():

        def hook(t, name=name):
            grad, t.grad = t.grad, None
            opt.update(name, t.data, grad)

        p.register_post_accumulate_grad_hook(hook)
    torch.cuda.reset_peak_memory_stats()
    t_plain = statistics.median(_train_steps(plain, dev))
    peak_plain = torch.cuda.max_memory_allocated()
    del plain
    torch.cuda.empty_cache()
    row(
        "1B train step, fused SGD, plain bf16: s/step",
        f"{t_plain:.3f}",
        f"peak {peak_plain / 1e9:.2f} GB",
    )
    for label, budget in (("80% of plain peak", int(0.8 * peak_plain)), ("25% of size", size // 4)):
        kw = {"trainable": True, "optimizer": nzo.optim.SGD(lr=1e-4), "progress": False}
        torch.cuda.reset_peak_memory_stats()
        try:
            model = nzo.dispatch(copy.deepcopy(base), max_gpu_mem=budget, **kw)
        except nzo.PlanError as e:  # below the planner's minimum: take the minimum
            budget, label = e.minimum_device_bytes, f"{label} -> planner's minimum"
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = nzo.dispatch(copy.deepcopy(base), max_gpu_mem=budget, **kw)
        t = statistics.median(_train_steps(model, dev))
        peak = torch.cuda.max_memory_allocated()
        row(
            f"1B train step, budget {label}: speed vs plain fused",
            f"{t_plain / t:.2f}x",
            f"{t:.3f} s/step; peak {peak / 1e9:.2f} GB = {peak / budget:.3f} of budget, "
            f"{peak / peak_plain:.3f} of plain",
        )
        nzo.undispatch(model)
        del model
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", type=Path, help="write real weights and wheels here (on the CPU)")
    ap.add_argument("--data", type=Path, help="what --prepare wrote")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device")
    import triton

    dev = "cuda"
    interp = os.environ.get("TRITON_INTERPRET")
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, TRITON_INTERPRET={interp}"
    )
    print("| check | result | note |\n|---|---|---|")
    check_planes(dev)
    check_ans(dev, args.data)
    time_decode(dev)
    time_encode(dev)
    dispatch_1b(dev)
    train_1b(dev)


if __name__ == "__main__":
    main()
