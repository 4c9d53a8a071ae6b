"""Mixture-of-experts offloading (issue 11): the issue's table of numbers, from one run.

    python benchmarks/moe.py            # Mixtral + Qwen2-MoE built here, Mixtral-8x7B plans
                                        # (30 s on 2 quiet cores, 4 min at load average 5)
    python benchmarks/moe.py --quick    # tiny sizes, seconds (the smoke test)

Part 1, models built locally (transformers 5 classes, bf16, seeded random matrices of std 0.02,
norms at 1), dispatched lossless (codec zstd, device cpu) at --share of their bf16 size, with
speculative prefetch on and off; the plain model, resident, is the baseline of the same run:

- logits bit-identical to the plain model's at batch 1 and --batch, and the greedy tokens of a
  decode loop (KV cache, batch 1, --new-tokens after a --prompt-token prompt) identical;
- parameters left plain (uncompressed nn.Parameters) after dispatch, as a share of the model;
- per decode step (one token after the prompt; counters of ``stats["experts"]`` differenced
  over the steps): expert bytes decoded / all expert bytes, routed uses, hits, on-demand
  fetches, hit rate; the guesses of the next layer's experts and the misses they avoided, and
  the guess rule applied to the plain model's own decode (an oracle for guess_accuracy);
- ms/token of the dispatched and the plain model: the median over steps and --repeats (CPU: info).

Part 2, Mixtral-8x7B from its config alone (transformers' MixtralConfig defaults, built on the
meta device), planned for a 24 GB GPU + 64 GB host at 25 GB/s PCIe, lossless and lossy k=3: the
per-token lower bound and its terms, at the planner's default decode rate and, when decoding is
the larger term, again at --decode-gbps.

Random routers route near-uniformly: hit rates and guess accuracy here are a floor for trained
models, whose routing is skewed and correlated from layer to layer.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

import neuzip_offload as nzo
from neuzip_offload import evaluate

KINDS = ("mixtral", "qwen2_moe")
COUNTERS = (
    "uses",
    "hits",
    "fetches",
    "decoded_bytes",
    "guessed",
    "guessed_right",
    "prefetched",
    "misses_avoided",
)
GOALS_S = {"lossless": 0.6, "lossy k=3": 0.4}  # the per-token bounds for Mixtral-8x7B
MOE_INFINITY_S = 0.735  # Mixtral-8x7B on an A5000, as published


def build(kind: str, a: argparse.Namespace) -> torch.nn.Module:
    """A seeded random MoE model of ``kind`` in bf16: matrices at std 0.02, norms left at 1."""
    common = dict(
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=a.top_k,
        vocab_size=a.vocab,
        max_position_embeddings=a.prompt + a.new_tokens + 16,
    )
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(
            intermediate_size=a.intermediate, num_local_experts=a.experts, **common
        )
        model = transformers.MixtralForCausalLM(cfg)
    else:  # experts half as wide as the shared expert, as in Qwen2-MoE's own configs
        cfg = transformers.Qwen2MoeConfig(
            intermediate_size=a.intermediate,
            moe_intermediate_size=a.intermediate // 2,
            shared_expert_intermediate_size=a.intermediate,
            num_experts=a.experts,
            **common,
        )
        model = transformers.Qwen2MoeForCausalLM(cfg)
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(torch.bfloat16).eval()


def bf16_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class Decode:
    """One greedy decode: its tokens, each step's seconds and the experts' counters per step."""

    tokens: torch.Tensor
    seconds: list[float]
    per_step: dict[str, float] | None  # None: the plain model


def experts_counters(model: torch.nn.Module) -> dict[str, int] | None:
    handle = getattr(model, "neuzip", None)
    if handle is None:
        return None
    report = handle.stats["experts"]
    return {k: report[k] for k in COUNTERS}


def greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> Decode:
    """Prefill ``prompt``, then ``steps`` one-token steps on the KV cache, argmax each time.
    The experts' counters are read after the prefill and after the last step (reading them
    settles the executor, so not between steps)."""
    kv = {evaluate.cache_keyword(model): transformers.DynamicCache()}
    with torch.no_grad():
        out = model(prompt, use_cache=True, **kv)
        nxt = out.logits[:, -1:].argmax(-1)
        tokens = [nxt]
        before = experts_counters(model)
        seconds = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(nxt, use_cache=True, **kv)
            nxt = out.logits[:, -1:].argmax(-1)
            seconds.append(time.perf_counter() - t)
            tokens.append(nxt)
    after = experts_counters(model)
    per_step = None
    if before is not None and after is not None:
        per_step = {k: (after[k] - before[k]) / steps for k in COUNTERS}
    return Decode(torch.cat(tokens, dim=1), seconds, per_step)


class RouterLog:
    """Each MoE layer's router calls on a plain model: its input and the experts it picked."""

    def __init__(self, model: torch.nn.Module):
        self.gates = [layer.mlp.gate for layer in model.model.layers]
        self.calls: list[list[tuple[torch.Tensor, set[int]]]] = [[] for _ in self.gates]
        self._hooks = [
            g.register_forward_hook(lambda m, args, out, i=i: self._record(i, args[0], out))
            for i, g in enumerate(self.gates)
        ]

    def _record(self, i: int, hidden: torch.Tensor, out: tuple) -> None:
        self.calls[i].append((hidden.detach().clone(), set(out[2].flatten().tolist())))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def guess_right(self, first_call: int) -> tuple[int, int]:
        """The guess rule on this log, from call ``first_call`` on: layer i+1's router applied
        to layer i's router input. Returns (experts guessed right, experts routed) over the
        layers after the first."""
        right = routed = 0
        with torch.no_grad():
            for i in range(1, len(self.gates)):
                for (h, _), (_, picked) in zip(
                    self.calls[i - 1][first_call:], self.calls[i][first_call:], strict=True
                ):
                    guess = set(self.gates[i](h)[2].flatten().tolist())
                    right += len(guess & picked)
                    routed += len(picked)
        return right, routed


def same_logits(model: torch.nn.Module, plain: torch.nn.Module, ids: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(model(ids).logits, plain(ids).logits)


def yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def experts_lines(plan) -> list[str]:
    """The plan table's expert cache lines (none until the planner gives experts a pool)."""
    return [line for line in plan.table().splitlines() if line.startswith("experts:")]


@dataclass
class Dispatched:
    """A dispatched copy of the plain model and its decode runs."""

    model: torch.nn.Module
    speculate: bool
    dispatch_seconds: float
    runs: list[Decode]

    def step(self) -> dict[str, float]:
        """The experts' counters per decode step: the first run's (they are deterministic)."""
        return self.runs[0].per_step

    def ms_per_token(self) -> float:
        return statistics.median(x for d in self.runs for x in d.seconds) * 1e3


def measure_model(kind: str, a: argparse.Namespace) -> None:
    plain = build(kind, a)
    size = bf16_bytes(plain)
    gen = torch.Generator().manual_seed(a.seed + 1)
    ids = torch.randint(0, a.vocab, (a.batch, a.prompt), generator=gen)
    ours = {}
    # the reserve for activations, KV cache and stacked experts at the lengths this run uses
    # (the default estimate assumes 1024 tokens, most of these tiny models' budget)
    reserve = nzo.estimate_reserve(plain, seq_len=a.prompt + a.new_tokens, batch=a.batch)
    for speculate in (True, False):
        t = time.perf_counter()
        model = nzo.dispatch(
            copy.deepcopy(plain),
            max_gpu_mem=int(a.share * size),
            device="cpu",
            codec="zstd",
            reserve=reserve,
            speculate=speculate,
            progress=False,
        )
        ours[speculate] = Dispatched(model, speculate, time.perf_counter() - t, [])
    # the logits checks come first: they also warm every model up before the timed loops
    same = {
        (s, n): same_logits(d.model, plain, ids[:n]) for s, d in ours.items() for n in (1, a.batch)
    }
    base: list[Decode] = []
    # the repeats interleave plain and dispatched runs, so that load on the machine hits all alike
    for _ in range(a.repeats):
        base.append(greedy(plain, ids[:1], a.new_tokens))
        for d in ours.values():
            d.runs.append(greedy(d.model, ids[:1], a.new_tokens))
    log = RouterLog(plain)  # the guess rule's own accuracy, on the plain model's decode
    oracle = greedy(plain, ids[:1], a.new_tokens)
    log.close()
    assert torch.equal(oracle.tokens, base[0].tokens)
    print_model(kind, a, plain, same, base, ours, log.guess_right(first_call=1))


def print_model(
    kind: str,
    a: argparse.Namespace,
    plain: torch.nn.Module,
    same: dict[tuple[bool, int], bool],
    base: list[Decode],
    ours: dict[bool, Dispatched],
    oracle: tuple[int, int],
) -> None:
    size, params = bf16_bytes(plain), sum(p.numel() for p in plain.parameters())
    plan = ours[True].model.neuzip.plan
    expert_bytes = sum(b.decoded_bytes for b in plan.blocks if b.routed)
    tiers = [t for b, t in zip(plan.blocks, plan.tiers, strict=True) if b.routed]
    print(
        f"\n### {kind}: {params / 1e6:.1f}M parameters, {size / 2**20:.1f} MiB bf16, "
        f"{a.layers} layers x {a.experts} experts top-{a.top_k}, budget {a.share:.0%} "
        f"({a.share * size / 2**20:.1f} MiB); dispatched in {ours[True].dispatch_seconds:.1f} s\n"
    )
    print(
        f"expert blocks: {len(tiers)} ({expert_bytes / 2**20:.1f} MiB decoded, "
        f"{expert_bytes / size:.0%} of the model); tiers "
        + ", ".join(f"{tiers.count(t)} {t}" for t in dict.fromkeys(tiers))
    )
    distinct = len(set(base[0].tokens.flatten().tolist()))
    print(
        f"greedy decode: {distinct} distinct tokens of {base[0].tokens.numel()} (a random "
        "model's greedy text loops, so consecutive steps tend to route alike)"
    )
    for line in experts_lines(plan) or ["experts: (no expert cache line in this plan's table)"]:
        print(line)
    print("\n| measure | speculate on | speculate off | goal |")
    print("|---|---|---|---|")

    def row(what: str, f, goal: str = "") -> None:
        print(f"| {what} | {f(ours[True])} | {f(ours[False])} | {goal} |")

    ref = base[0].tokens
    for n in (1, a.batch):
        row(f"logits bit-identical, batch {n}", lambda d, n=n: yes(same[d.speculate, n]), "yes")
    row(
        f"greedy tokens identical ({a.new_tokens} new, batch 1, every repeat)",
        lambda d: yes(all(torch.equal(r.tokens, ref) for r in d.runs + base)),
        "yes",
    )
    row(
        "plain (uncompressed) parameters after dispatch / all",
        lambda d: f"{sum(p.numel() for p in d.model.parameters()) / params:.2%}",
        "< 10%",
    )
    row(
        "per decode step: expert bytes decoded / all expert bytes",
        lambda d: f"{d.step()['decoded_bytes'] / expert_bytes:.3f}",
        f"<= {a.top_k}/{a.experts} = {a.top_k / a.experts:.3f} + misses",
    )
    for what, key in (("routed uses", "uses"), ("hits", "hits"), ("fetched on demand", "fetches")):
        row(f"per decode step: {what}", lambda d, key=key: f"{d.step()[key]:.2f}")
    row(
        "per decode step: hit rate = hits / uses (routing near-uniform)",
        lambda d: _ratio(d.step()["hits"], d.step()["uses"]),
        "reported",
    )
    row(
        "per decode step: guessed / fetched ahead",
        lambda d: f"{d.step()['guessed']:.2f} / {d.step()['prefetched']:.2f}",
    )
    row(
        "guess_accuracy = guessed_right / guessed (routing near-uniform)",
        lambda d: _ratio(d.step()["guessed_right"], d.step()["guessed"]),
        "measured",
    )
    row(
        "per decode step: misses avoided by guesses",
        lambda d: f"{d.step()['misses_avoided']:.2f}",
        "measured",
    )
    plain_ms = statistics.median(x for r in base for x in r.seconds) * 1e3
    row(
        f"ms/token, median (plain: {plain_ms:.1f})",
        lambda d: f"{d.ms_per_token():.1f}",
        "info (CPU)",
    )
    on, off = ours[True].step(), ours[False].step()
    guessable = a.top_k * (a.layers - 1)  # batch 1: top_k distinct experts per layer and token
    print(
        f"\nspeculation: {off['fetches']:.2f} on-demand fetches per step without, "
        f"{on['fetches']:.2f} with (same tokens); {on['prefetched'] - on['misses_avoided']:.2f} "
        f"fetches ahead per step found no use in their slot. Guessed right per step "
        f"{on['guessed_right']:.2f} of the {guessable} routed uses in the layers a guess serves "
        f"(all but the first): {_ratio(on['guessed_right'], guessable)}. The guess rule itself "
        f"(layer i+1's router on layer i's router input), applied to the plain model's decode: "
        f"{oracle[0]} of {oracle[1]} right, {_ratio(*oracle)} (uniform chance: "
        f"{a.top_k / a.experts:.0%})."
    )


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.1%}" if den else "n/a"


def mixtral_8x7b_plans(a: argparse.Namespace) -> None:
    """Plan Mixtral-8x7B from a config.json written here (transformers' defaults are it)."""
    cfg = transformers.MixtralConfig()
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)
        model = nzo.model_from_config(Path(d), torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n## Mixtral-8x7B plan ({params / 1e9:.2f}B parameters, from its config on the meta "
        "device): 24 GB GPU + 64 GB host, PCIe 25 GB/s\n"
    )
    rows, lines = [], []
    cases = [
        ("lossless", {"mode": "lossless"}),
        ("lossy k=3", {"mode": "lossy", "mantissa_bits": 3}),
    ]
    for label, kw in cases:
        for rate in (None, a.decode_gbps):
            with warnings.catch_warnings():  # this machine has less than 64 GB: that is known
                warnings.filterwarnings("ignore", message=".*more than this machine's memory")
                plan = nzo.plan_model(
                    model,
                    "24GB",
                    max_cpu_mem="64GB",
                    pcie_gbps=25,
                    decode_gbps=rate,
                    **kw,
                )
            pcie, decode = plan.seconds_lower_bound(), plan.seconds_decoding()
            rows.append(
                f"| {label} | {plan.options.decode_gbps:g} ({plan.options.decode_source}) | "
                f"{plan.bits_per_weight:.2f} | {plan.pcie_bytes_per_forward / 1e9:.2f} | "
                f"{plan.decoded_bytes_per_forward / 1e9:.2f} | {pcie:.3f} | {decode:.3f} | "
                f"**{plan.seconds_bound():.3f}** ({'decode' if decode > pcie else 'PCIe'}) | "
                f"<= {GOALS_S[label]} |"
            )
            lines += [
                f"{label}, {plan.options.decode_gbps:g} GB/s: {x}" for x in experts_lines(plan)
            ]
            if rate is None and decode <= pcie:
                break  # PCIe bounds it already: a faster decoder changes nothing
    print(
        "| mode | decode GB/s (source) | bits/weight | GB/token PCIe | GB/token decoded | "
        "PCIe s | decode s | bound s/token (larger term) | goal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\nanchor: MoE-Infinity {MOE_INFINITY_S} s/token measured on an A5000. The bound is the "
        "larger of the PCIe and decode terms (they overlap); rows at the default rate assume "
        "the planner's modelled GPU decoder, the others --decode-gbps."
    )
    for line in lines or ["experts: (no expert cache line in these plans' tables)"]:
        print(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds (smoke test)")
    ap.add_argument(
        "--models", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS)
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512, help="an expert's (Qwen: half)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--share", type=float, default=0.4, help="budget, fraction of bf16 size")
    ap.add_argument("--batch", type=int, default=4, help="the batch > 1 of the logits check")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="decode loops per model (times)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--decode-gbps",
        type=float,
        default=200.0,
        help="a faster GPU decoder for the 8x7B plan, used when decoding bounds it",
    )
    ap.add_argument("--no-plan", action="store_true", help="skip the Mixtral-8x7B plans")
    a = ap.parse_args(argv)
    kinds = [k.strip() for k in a.models.split(",") if k.strip()]
    if unknown := sorted(set(kinds) - set(KINDS)):
        ap.error(f"--models: unknown {unknown}")
    a.models = kinds
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.vocab = 64, 128, 4, 256
        a.prompt, a.new_tokens, a.batch, a.repeats = 6, 4, 2, 1
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; lossless zstd, device cpu; "
        f"args {json.dumps({k: v for k, v in vars(a).items() if k != 'models'})}"
    )
    t = time.perf_counter()
    for kind in a.models:
        measure_model(kind, a)
    if not a.no_plan:
        mixtral_8x7b_plans(a)
    print(f"\ntotal {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
