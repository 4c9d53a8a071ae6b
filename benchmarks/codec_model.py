"""A performance model of the GPU rANS codec, read off the compiled SASS of its kernels (a MODEL).

    python benchmarks/codec_model.py                      # sm_90 and sm_89, decode and encode
    python benchmarks/codec_model.py --quick              # sm_90, the lossless decoder only
    python benchmarks/codec_model.py --write-baseline benchmarks/codec_model_baseline.json
    python benchmarks/codec_model.py --triton-path /tmp/t36  # compiled by another Triton (3.6)

No GPU is needed. The steps:

1. Record: the codec's own Triton paths run under Triton's interpreter on a "block" of two small
   bf16 tensors (kernels/aot.py's LaunchRecorder gives each launch's specialization; a thin
   wrapper here adds its grid). ``drive_decode`` / ``drive_encode`` are the one seam to the
   library: they call what the executor and the training step call, so the kernels and launch
   structure measured are whatever the code has today.
2. Compile each recorded specialization for sm_90 / sm_89 with Triton in a subprocess (a fresh
   TRITON_CACHE_DIR, no TRITON_* settings), and disassemble the cubin with the cuobjdump Triton
   ships: registers (``--dump-resource-usage``), shared memory (Triton's metadata), SASS.
3. Per kernel: loops are the backward branches; the step loop is the top-level loop that stores
   to global memory and holds a warp operation with the most word loads (a decoder's), else the
   most ballots per instruction (an encoder's), else the largest (``step_rank``); the other loops
   are the prologue and tails, counted by ``KernelModel.other_trips``. One warp issues its
   body in order, one instruction per cycle, each instruction waiting for its source registers
   (latencies below): three iterations are simulated and the third one's cycles are the
   dependent chain per step. Global loads take their latency from where their address comes
   from: from a warp operation (the renormalization scan) -> the word stream, L1 (a 128-B line
   serves several steps); from another loaded value (the decoded state) -> a table gather, L1
   while the resident warps' tables fit in L1, else L2; from the loop counter only -> a plane
   stream (raw bytes, symbols), DRAM (a new sector per step). A step then takes max(chain,
   resident warps x instructions / 4 schedulers) cycles.
4. Per launch: programs scale with the tensor (per chunk for kernels with a CHUNK constexpr,
   else per element); resident programs from occupancy (registers, shared memory, warps and
   CTAs per SM); time = max(1, programs / resident) x program cycles / clock (programs start as
   others end: no rounding to whole waves), at least the HBM time of the bytes moved, plus a
   fixed launch gap. The decoder's prologue is counted (see ``KernelModel.other_trips``). A
   layer or tensor is the sum over its launches (one stream, in series).

Old design beside the new: ``--write-baseline`` stores this run's figures in a JSON (written once
from the commit before issue 12's redesign: benchmarks/codec_model_baseline.json); later runs
print its figures in "old" columns where they differ.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Triton's interpreter records the launches on this CPU-only path; set before Triton is imported.
if "--worker" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "benchmarks" / "codec_model_baseline.json"

# ---------------------------------------------------------------------------------------------
# assumptions (every figure printed is a model built on these)
# ---------------------------------------------------------------------------------------------

# Latencies in cycles, by instruction class.
LATENCY = {
    "L1": 35,  # global load hitting L1
    "L2": 270,  # global load hitting L2
    "DRAM": 550,  # global load from HBM
    "shared": 30,  # LDS
    "shfl": 33,  # one SHFL stage
    "redux": 33,  # REDUX (warp reduction), as a shuffle stage
    "vote": 10,  # VOTE / MATCH
    "sfu": 15,  # POPC, FLO, BREV, MUFU, conversions
    "s2r": 25,  # S2R / CS2R special registers
    "local": 35,  # LDL: spills hit L1
    "alu": 5,  # integer / logic / float ALU, IMAD, SEL, PRMT, SETP ...
}
# Entries of a chunk's frequency table (the exponents it holds): ~20 on MiniLM, ~30-40 assumed
# for a trained bf16 LLM (SmolLM2's, dequantized from 4-bit GGUF, hold ~110-125)
TABLE_ENTRIES = 40
LAUNCH_GAP_US = 20.0  # per kernel launch: Triton's Python launch path and the device gap
HOST_SYNC_US = 50.0  # per host round trip the launcher makes (device -> host copy and back)


@dataclass(frozen=True)
class Hardware:
    name: str
    sms: int
    ghz: float
    hbm_gbps: float
    max_warps: int  # resident warps per SM
    max_ctas: int  # resident CTAs per SM
    smem: int  # shared memory per SM usable by CTAs, bytes
    l1: int  # L1 + shared memory per SM, bytes
    regs: int = 65536  # registers per SM


HARDWARE = {
    90: Hardware("H100 SXM", 132, 1.83, 3350.0, 64, 32, 228 * 1024, 256 * 1024),
    89: Hardware("L40S", 142, 2.52, 864.0, 48, 24, 100 * 1024, 128 * 1024),
}

# One Llama-3-8B decoder layer: (name, rows, cols).
LLAMA3_8B_LAYER = (
    ("q_proj", 4096, 4096),
    ("k_proj", 1024, 4096),
    ("v_proj", 1024, 4096),
    ("o_proj", 4096, 4096),
    ("gate_proj", 14336, 4096),
    ("up_proj", 14336, 4096),
    ("down_proj", 4096, 14336),
)
K_PROJ = (("k_proj", 1024, 4096),)

# ---------------------------------------------------------------------------------------------
# 1. recording the launches
# ---------------------------------------------------------------------------------------------

DRIVE_TENSORS = 2  # tensors per driven block: tells launches per tensor from launches per block
DRIVE_N = 4096  # elements per driven tensor (a multiple of 1024: whole programs of most kernels)


@dataclass
class Launch:
    kernel: str
    grid: int  # programs
    spec: Any  # aot.Spec


@dataclass
class Recording:
    what: str  # "decode bf16 lossless" ...
    launches: list[Launch]
    host_syncs: int  # .cpu() / .item() / .tolist() calls made by the launchers
    bytes_per_weight: float  # compressed bytes per weight (exponent stream, raw plane, tables)
    # of those, the ones a block of any size makes once (the rest scale with its tensors);
    # None: not measured, all taken per tensor
    block_syncs: int | None = None


@dataclass(frozen=True)
class Case:
    label: str
    mode: str
    k: int = 0
    lanes: int | None = None  # None: the codec's default

    def config(self) -> Any:
        from neuzip_offload.config import CodecConfig

        lanes = {} if self.lanes is None else {"lanes": self.lanes}
        if self.mode == "lossless":
            return CodecConfig(codec="ans", **lanes)
        return CodecConfig(codec="ans", mode="lossy", mantissa_bits=self.k, **lanes)


DECODE_CASES = (Case("bf16 lossless", "lossless"), Case("bf16 lossy k=3", "lossy", 3))


def _tensors() -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(DRIVE_N, generator=gen) * 0.02).to(torch.bfloat16)
        for _ in range(DRIVE_TENSORS)
    ]


def drive_decode(cts: list[Any], outs: list[Any]) -> None:
    """Decode one block's compressed tensors into ``outs`` with the device decoder (the seam):
    as the executor does, planes packed in one buffer, outputs views of one slot, through the
    scheduler's Decoder with the device path forced (the interpreter runs its launches)."""
    import torch

    from neuzip_offload.scheduler.accounting import Accountant
    from neuzip_offload.scheduler.decoder import Decoder
    from neuzip_offload.scheduler.layout import PackedLayout, bind, pack, slot_layout
    from neuzip_offload.scheduler.streams import Streams

    layout = PackedLayout.of(cts)
    packed = bind(cts, layout, pack(cts, lambda n: torch.empty(n, dtype=torch.uint8)))
    keys = [f"t{i}" for i in range(len(cts))]
    entries, slot_bytes = slot_layout(packed, keys)
    slot = torch.empty(slot_bytes, dtype=torch.uint8)
    decoder = Decoder(["block"], Streams(torch.device("cpu")), Accountant(1 << 40), 0, None)
    decoder.on_device = True  # the CUDA path, whose kernels the interpreter runs here
    decoder.decode_block(packed, entries, slot, 0)
    for e, out in zip(entries, outs, strict=True):
        out.view(-1).copy_(e.view(slot).view(-1))


def drive_encode(tensors: list[Any], config: Any) -> list[Any]:
    """Compress one block's tensors with the device encoder (the seam): the path compress_many()
    takes for CUDA tensors (a split per tensor, one encoder launch for the block), forced onto
    the CPU under the interpreter."""
    from neuzip_offload import codec

    forced = codec._use_triton
    codec._use_triton = lambda t: True  # type: ignore[assignment]
    try:
        return codec.compress_many(tensors, config)
    finally:
        codec._use_triton = forced  # type: ignore[assignment]


@dataclass
class _Tap:
    """Grids of interpreted launches and host round trips, beside aot's LaunchRecorder."""

    grids: list[tuple[str, int]] = field(default_factory=list)
    syncs: int = 0


def _install_tap(tap: _Tap) -> Callable[[], None]:
    import torch
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run
    saved = {name: getattr(torch.Tensor, name) for name in ("cpu", "item", "tolist")}

    def tapped_run(kernel, *args, **kwargs):
        grid = kwargs.get("grid")
        grid = grid(kwargs) if callable(grid) else grid
        tap.grids.append((kernel.fn.__qualname__, math.prod(grid)))
        return run(kernel, *args, **kwargs)

    def counting(original):
        def call(self, *args, **kwargs):
            tap.syncs += 1
            return original(self, *args, **kwargs)

        return call

    interpreter.InterpretedFunction.run = tapped_run
    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(original))

    def uninstall() -> None:
        interpreter.InterpretedFunction.run = run
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)

    return uninstall


def _record(what: str, body: Callable[[], float]) -> Recording:
    """Run ``body`` (returns compressed bytes per weight) with the recorders installed."""
    from neuzip_offload.kernels import aot

    recorder = aot.LaunchRecorder()
    tap = _Tap()
    with recorder.recording():
        uninstall = _install_tap(tap)
        try:
            bpw = body()
        finally:
            uninstall()
    specs = {s.name: s for s in recorder.specs()}
    launches = [Launch(name, grid, specs[name]) for name, grid in tap.grids]
    return Recording(what, launches, tap.syncs, bpw)


def record_decode(case: Case) -> Recording:
    import torch

    from neuzip_offload import codec

    tensors = _tensors()
    cts = [codec.compress(t, config=case.config()) for t in tensors]  # host encoder
    outs = [torch.empty_like(t) for t in tensors]

    def body() -> float:
        drive_decode(cts, outs)
        return sum(ct.nbytes for ct in cts) / (DRIVE_N * DRIVE_TENSORS)

    rec = _record(f"decode {case.label}", body)
    if case.mode == "lossless" and not all(
        torch.equal(a, b) for a, b in zip(outs, tensors, strict=True)
    ):
        raise RuntimeError("the recorded decode is not exact: the model would measure a bug")
    return rec


def record_encode(case: Case) -> Recording:
    tensors = _tensors()

    def body() -> float:
        cts = drive_encode(tensors, case.config())
        return sum(ct.nbytes for ct in cts) / (DRIVE_N * DRIVE_TENSORS)

    rec = _record(f"encode {case.label}", body)
    # the same path on one tensor: round trips that do not scale with the block's tensors
    one = _record("one tensor", lambda: len(drive_encode(tensors[:1], case.config())))
    per_tensor = (rec.host_syncs - one.host_syncs) / (DRIVE_TENSORS - 1)
    rec.block_syncs = max(0, round(one.host_syncs - per_tensor))
    return rec


# ---------------------------------------------------------------------------------------------
# 2. compiling and disassembling
# ---------------------------------------------------------------------------------------------


def cuobjdump() -> Path | None:
    """The cuobjdump Triton ships (None when missing)."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


@dataclass
class Compiled:
    kernel: str
    arch: int
    registers: int
    shared: int
    num_warps: int
    sass: str


# Put first on the compile workers' PYTHONPATH (--triton-path: model another Triton, e.g. the 3.6
# torch 2.11 pins, with the launches still recorded under the local one's interpreter)
TRITON_PATH: list[str] = []


def compile_kernels(specs: list[Any], arch: int) -> dict[str, Compiled]:
    """Compile ``specs`` (aot.Spec) for ``arch`` in a clean subprocess (with the Triton on
    TRITON_PATH, if any); SASS via the local Triton's cuobjdump."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found in triton/backends/nvidia/bin")
    with tempfile.TemporaryDirectory(prefix="nz_model_") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"arch": arch, "specs": [s.to_json() for s in specs]}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; 1 is its default
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [*TRITON_PATH, str(ROOT), env.get("PYTHONPATH")])
        )
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(job), tmp],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            raise RuntimeError(f"compile worker for sm_{arch} failed:\n{proc.stderr[-3000:]}")
        out = {}
        for s in specs:
            meta = json.loads((Path(tmp) / f"{s.name}.json").read_text())
            cubin = str(Path(tmp) / f"{s.name}.cubin")
            usage = _run(tool, "--dump-resource-usage", cubin)
            regs = re.search(r"REG:(\d+)", usage)
            out[s.name] = Compiled(
                s.name,
                arch,
                int(regs.group(1)) if regs else 0,
                meta["shared"],
                meta["num_warps"],
                _run(tool, "-sass", cubin),
            )
        return out


def _worker_triton_version() -> str:
    """The version of the Triton the compile workers import (TRITON_PATH first)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(TRITON_PATH))
    code = "import triton; print(triton.__version__)"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def _run(tool: Path, *args: str) -> str:
    return subprocess.run([str(tool), *args], capture_output=True, text=True, check=True).stdout


def _worker(job_path: str, out_dir: str) -> None:
    """Compile each spec of the job (Triton >= 3.2's ASTSource) and write cubin + metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from neuzip_offload.kernels import aot

    job = json.loads(Path(job_path).read_text())
    target = GPUTarget("cuda", job["arch"], 32)
    backend = make_backend(target)
    for d in job["specs"]:
        spec = aot.Spec.from_json(d)
        fn = getattr(importlib.import_module(spec.module), spec.name)
        index = {name: (i,) for i, (name, _, _) in enumerate(spec.params)}
        src = ASTSource(
            fn,
            {name: ty for name, ty, _ in spec.params},
            constexprs={index[name]: v for name, v in spec.constexprs},
            attrs={index[name]: backend.parse_attr(a) for name, _, a in spec.params if a},
        )
        kernel = triton.compile(src, target=target, options=dict(spec.options))
        Path(out_dir, f"{spec.name}.cubin").write_bytes(kernel.asm["cubin"])
        meta = {"shared": int(kernel.metadata.shared), "num_warps": kernel.metadata.num_warps}
        Path(out_dir, f"{spec.name}.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------
# 3. the SASS: loops, instruction classes, the in-order dependent chain
# ---------------------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_REG = re.compile(r"\b(U?R\d+|U?P\d)(\.64|\.128)?\b")
_SETP = re.compile(r"^[A-Z]*SETP|^PLOP3|^R2P")
# (RED, a global reduction, writes no register; REDUX, a warp reduction, does)
_NO_DEST = re.compile(
    r"^(ST|RED(?!UX)|BRA|EXIT|BAR|BSYNC|BSSY|WARPSYNC|NOP|CALL|RET|MEMBAR|YIELD|CCTL)"
)


@dataclass
class Instr:
    addr: int
    op: str  # opcode with modifiers: LDG.E.U16
    dests: list[str]
    srcs: list[str]

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def _regs(token: str) -> list[str]:
    """Register names in an operand; R2.64 is R2 and R3 (RZ, PT and URZ are not registers)."""
    names = []
    for name, width in _REG.findall(token):
        kind, num = re.match(r"(U?[RP])(\d+)", name).groups()
        count = {".64": 2, ".128": 4}.get(width, 1)
        names += [f"{kind}{int(num) + i}" for i in range(count)]
    return names


def parse_sass(text: str) -> list[Instr]:
    out = []
    for addr, body in _LINE.findall(text):
        guard = re.match(r"@!?(U?P\d|PT)\s+", body)
        srcs = _regs(guard.group(1)) if guard else []
        body = body[guard.end() :] if guard else body
        op, _, rest = body.partition(" ")
        operands = [o.strip() for o in rest.split(",")] if rest.strip() else []
        dests: list[str] = []
        if operands and not _NO_DEST.match(op) and not operands[0].startswith(("[", "desc", "c[")):
            i = 0
            while i < len(operands) and re.fullmatch(r"!?(U?P\d|PT)", operands[i]):
                dests += _regs(operands[i])
                i += 1
            if not _SETP.match(op) and i < len(operands):
                wide = 2 if ".64" in op or ".WIDE" in op else 4 if ".128" in op else 1
                first = _regs(operands[i])
                if first:
                    kind, num = re.match(r"(U?R)(\d+)", first[0]).groups()
                    dests += [f"{kind}{int(num) + j}" for j in range(wide)]
                i += 1
                while i < len(operands) and re.fullmatch(r"U?P\d|PT", operands[i]):
                    dests += _regs(operands[i])  # carry / predicate outputs
                    i += 1
            operands = operands[i:]
        for o in operands:
            srcs += _regs(o)
        out.append(Instr(int(addr, 16), op, dests, srcs))
    return out


def _target(ins: Instr, text: str) -> int | None:
    m = re.search(
        rf"/\*{ins.addr:04x}\*/[^;]*?\b(?:BRA|CALL)[.A-Z]*\s+(?:\S+,\s*)?(0x[0-9a-f]+)", text
    )
    return int(m.group(1), 16) if m else None


@dataclass
class Loop:
    start: int
    end: int  # address of the backward branch
    body: list[Instr]
    top: bool  # not inside another loop

    @property
    def stores_global(self) -> bool:
        return any(i.base in ("STG", "ST", "RED", "ATOMG") for i in self.body)


def find_loops(instrs: list[Instr], text: str) -> list[Loop]:
    """Loops are backward branches; a CALL inside a loop brings its callee's body along."""
    by_addr = {i.addr: k for k, i in enumerate(instrs)}
    spans = []
    for ins in instrs:
        if ins.base == "BRA":
            t = _target(ins, text)
            if t is not None and t < ins.addr and t in by_addr:
                spans.append((t, ins.addr))
    loops = []
    for s, e in spans:
        body = []
        for ins in instrs[by_addr[s] : by_addr[e] + 1]:
            body.append(ins)
            if ins.base == "CALL":
                t = _target(ins, text)
                for callee in instrs[by_addr.get(t, len(instrs)) :]:
                    body.append(callee)
                    if callee.base == "RET":
                        break
        top = not any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2 in spans)
        loops.append(Loop(s, e, body, top))
    return loops


_WARP = ("SHFL", "REDUX", "VOTE", "VOTEU", "MATCH")
_CLASS = {"LD": "LDG", "LDG": "LDG", "LDS": "LDS", "ST": "STG", "STG": "STG", "STS": "STS"}
_CLASS.update({op: "warp" for op in _WARP} | {"LDL": "spill", "STL": "spill"})


def classes(body: list[Instr]) -> dict[str, int]:
    """Instruction counts by what they do (global / shared loads and stores, warp ops, spills)."""
    counts: dict[str, int] = {}
    for ins in body:
        kind = _CLASS.get(ins.base, "other")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _latency(ins: Instr, load_level: Callable[[str], str], role: str) -> tuple[int, str]:
    """(cycles until the result is ready, the class named on the chain)."""
    b = ins.base
    if b in ("LDG", "LD"):
        level = load_level(role)
        return LATENCY[level], f"{role} load ({level})"
    table = {
        "LDS": ("shared", "shared load"),
        "SHFL": ("shfl", "shuffles"),
        "REDUX": ("redux", "warp reductions"),
        "VOTE": ("vote", "votes"),
        "VOTEU": ("vote", "votes"),
        "MATCH": ("vote", "votes"),
        "LDL": ("local", "spill loads"),
        "S2R": ("s2r", "special registers"),
        "CS2R": ("s2r", "special registers"),
        "S2UR": ("s2r", "special registers"),
    }
    if b in ("POPC", "FLO", "BREV", "MUFU", "I2F", "F2I", "F2F", "I2I", "FRND"):
        return LATENCY["sfu"], "popc/conversions"
    if b in table:
        cls, name = table[b]
        return LATENCY[cls], name
    return LATENCY["alu"], "ALU"


def word_loads(loop: Loop) -> int:
    """16-bit loads in ``loop`` whose address comes from a warp operation: the word stream, one
    load per decode step."""
    roles = load_roles(loop.body)
    return sum(
        1
        for i in loop.body
        if i.base in ("LDG", "LD") and "16" in i.op and roles.get(i.addr) == "word"
    )


def load_roles(body: list[Instr]) -> dict[int, str]:
    """Per global load (by address): "word" when its address comes from a warp operation,
    "table" when it comes from another loaded value, "plane" when from the loop counter only.
    Tags pass through ALU ops; a load's or warp op's result starts fresh (two passes: the loop
    carries registers)."""
    tags: dict[str, set[str]] = {}
    roles: dict[int, str] = {}
    for _ in range(2):
        for ins in body:
            src_tags = set().union(*(tags.get(r, set()) for r in ins.srcs))
            if ins.base in ("LDG", "LD"):
                roles[ins.addr] = (
                    "word" if "warp" in src_tags else "table" if "loaded" in src_tags else "plane"
                )
                new = {"loaded"}
            elif ins.base in ("LDS", "LDL"):
                new = {"loaded"}
            elif ins.base in _WARP:
                new = {"warp"}
            else:
                new = src_tags
            for r in ins.dests:
                tags[r] = set(new)
    return roles


@dataclass
class Chain:
    cycles: float  # per iteration, one warp, in-order issue
    stalls: dict[str, float]  # cycles waited, by the class of the awaited producer
    instructions: int


def simulate(body: list[Instr], load_level: Callable[[str], str], iterations: int = 3) -> Chain:
    """One warp issuing ``body`` in order ``iterations`` times (the last one is reported)."""
    roles = load_roles(body)
    ready: dict[str, tuple[float, str]] = {}
    t = 0.0
    stalls: dict[str, float] = {}
    start = 0.0
    for it in range(iterations):
        start, last = t, {}
        for ins in body:
            need = max((ready.get(r, (0.0, "")) for r in ins.srcs), default=(0.0, ""))
            issue = max(t + 1, need[0])
            if it == iterations - 1 and issue > t + 1:
                last[need[1]] = last.get(need[1], 0.0) + issue - t - 1
            t = issue
            lat, name = _latency(ins, load_level, roles.get(ins.addr, "plane"))
            for r in ins.dests:
                ready[r] = (t + lat, name)
        stalls = last
    return Chain(t - start, stalls, len(body))


# ---------------------------------------------------------------------------------------------
# 4. the kernel, launch and layer model
# ---------------------------------------------------------------------------------------------


@dataclass
class KernelModel:
    kernel: str
    arch: int
    registers: int
    shared: int
    num_warps: int
    ctas_per_sm: int
    step: Loop | None
    other_loops: list[Loop]
    straight: list[Instr]  # instructions outside every top-level loop
    constexprs: dict[str, Any]
    symbols_per_step: int | None
    symbols_per_program: int | None
    unroll: int = 1  # steps per trip of the step loop (the figures per step divide by it)

    @property
    def warps_per_sm(self) -> int:
        return self.ctas_per_sm * self.num_warps

    def step_trips(self) -> int:
        """Trips of the step loop: CHUNK / LANES symbols (or the overrides) per unrolled trip,
        else 1."""
        if self.symbols_per_program and self.symbols_per_step:
            return -(-self.symbols_per_program // self.symbols_per_step)
        return 1

    def other_trips(self, loop: Loop, mean_index: float) -> float:
        """Trips of another top-level loop (stated; a nested loop counts once per trip of its
        outer loop). The decoder's prologue (LUT_TILE, START_TILE constexprs), for a table of
        TABLE_ENTRIES entries: the loop storing words (the entries) takes TABLE_ENTRIES /
        LUT_TILE trips; the loop storing bytes (each symbol fills its run of slots, LUT_TILE a
        store, S stores per unrolled trip) is charged TABLE_ENTRIES + 2**PROB_BITS / (LUT_TILE
        S) trips of its whole body (outer and inner: an overestimate); the one storing nothing
        sums the table lengths of the
        chunks before its own, START_TILE a trip (``mean_index``: the case's mean chunk index in
        its tensor). A table walk of 2**PROB_BITS slots in TILE tiles elsewhere; else 1."""
        c = self.constexprs
        if word_loads(loop):  # a step loop's masked tail: at most one trip
            return 1
        if "HIST" in c:  # the encoder's prologue and tail, by what each loop does
            atomics = sum(i.base in ("ATOMS", "ATOM", "RED", "REDS") for i in loop.body)
            memory = any(i.base in ("LDG", "STG", "LD", "ST") for i in loop.body)
            if atomics >= 8:  # the histogram: CHUNK / HIST tiles
                return int(c["CHUNK"]) / int(c["HIST"])
            if atomics or memory:  # a tensor's ragged rest, the last 1-3 steps: no trip when the
                return 0  # chunk is whole
            return 32 if len(loop.body) > 100 else 1  # normalization: 32 bit-steps; the deficit
        if "LUT_TILE" in c:
            tile = int(c["LUT_TILE"])
            stores = [i.op for i in loop.body if i.base in ("STG", "ST")]
            byte_stores = sum(".U8" in op or ".S8" in op for op in stores)
            if byte_stores:  # the compiler unrolls the run's stores: LUT_TILE slots per store
                return TABLE_ENTRIES + (1 << int(c["PROB_BITS"])) / (tile * byte_stores)
            if stores:
                return -(-TABLE_ENTRIES // tile)
            return max(1.0, mean_index / int(c.get("START_TILE", tile)))
        if "PROB_BITS" in c and "TILE" in c:
            return max(1, (1 << int(c["PROB_BITS"])) // int(c["TILE"]))
        return 1

    def table_bytes(self) -> int:
        """A program's tables: the encoder's 257 int64 entries, a decoder's 2**PROB_BITS slot
        bytes and 256 int32 (f, cum) entries (ans.table_words)."""
        if "HIST" in self.constexprs:
            return 257 * 8
        return (1 << int(self.constexprs.get("PROB_BITS", 12))) + 1024

    def level(self, hw: Hardware, warps: float) -> Callable[[str], str]:
        fits = warps * self.table_bytes() <= hw.l1 - self.shared * self.ctas_per_sm

        def load_level(role: str) -> str:
            if role == "plane":
                return "DRAM"
            if role == "table":
                return "L1" if fits else "L2"
            return "L1"

        return load_level

    def program_cycles(
        self, hw: Hardware, warps: float, mean_index: float = 0.0
    ) -> tuple[float, Chain | None, float]:
        """(cycles of one program with ``warps`` resident warps per SM, the step loop's chain,
        the cycles before and around the step loop: the prologue)."""
        level = self.level(hw, warps)
        prologue = simulate(self.straight, level, iterations=1).cycles if self.straight else 0.0
        for loop in self.other_loops:
            own = "LUT_TILE" in self.constexprs and any(
                ".U8" in i.op for i in loop.body if i.base in ("STG", "ST")
            )  # the slot fill reads the entries the program just stored: L1
            c = simulate(loop.body, (lambda role: "L1") if own else level)
            trips = self.other_trips(loop, mean_index)
            prologue += trips * max(c.cycles, warps * c.instructions / 4)
        total, chain = prologue, None
        if self.step is not None:
            chain = simulate(self.step.body, level)
            total += self.step_trips() * max(chain.cycles, warps * chain.instructions / 4)
        return total, chain, prologue


def occupancy(hw: Hardware, regs: int, shared: int, warps: int) -> int:
    """Resident CTAs per SM: registers (allocated per warp in 256s), shared memory (+1 KB
    reserved per CTA), warps and CTAs."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (hw.regs // per_warp) // warps
    by_smem = hw.smem // (shared + 1024) if shared else hw.max_ctas
    return max(0, min(by_regs, by_smem, hw.max_warps // warps, hw.max_ctas))


def step_rank(lp: Loop) -> tuple[int, float, int]:
    """The step loop is the candidate loop ranked highest: by its word loads (a decoder's; ties
    to the first loop), else by its ballots (REDUX.OR) per instruction, then its size."""
    if word_loads(lp):
        return (word_loads(lp), 0.0, -lp.start)
    ballots = sum(i.op.startswith("REDUX.OR") for i in lp.body)
    return (0, ballots / max(1, len(lp.body)), len(lp.body))


def kernel_model(
    compiled: Compiled, spec: Any, hw: Hardware, args: argparse.Namespace
) -> KernelModel:
    text = compiled.sass
    instrs = parse_sass(text)
    loops = find_loops(instrs, text)
    tops = [lp for lp in loops if lp.top]
    storing = [lp for lp in tops if lp.stores_global]
    # the step loop renormalizes with a warp operation (the ballot); a table built in the
    # prologue is a storing loop too, without one
    warped = [lp for lp in storing if any(i.base in _WARP for i in lp.body)]
    # a decode step reads one renormalization word (a load addressed from the ballot): the
    # loop with the most steps, the first of equals (the decoder's unmasked main loop comes
    # before its masked tail). An encoder loads no word: its step loop is the one densest in
    # ballots (REDUX.OR per instruction; Triton 3.6 on sm_89 wraps the whole encoder, vote
    # histogram and all, in a loop with more ballots in all), else the largest
    step = max(warped or storing or tops, key=step_rank, default=None)
    covered = {i.addr for lp in tops for i in lp.body}
    c = dict(spec.constexprs)
    lanes = args.symbols_per_step or (int(c["LANES"]) if "LANES" in c else None)
    # steps per trip of an unrolled step loop: a decoder's word loads (it writes 4 steps a trip,
    # the compiler may unroll further), else the kernel's UNROLL constexpr (the encoder's 4)
    words = word_loads(step) if step is not None else 0
    per_step = max(1, int(c.get("LANES", 32)) // 32)  # a thread loads one word per lane it holds
    unroll = max(1, words // per_step) if words else int(c.get("UNROLL", 1))
    if lanes and not args.symbols_per_step:
        lanes *= unroll
    chunk = args.symbols_per_program or (int(c["CHUNK"]) if "CHUNK" in c else None)
    return KernelModel(
        compiled.kernel,
        compiled.arch,
        compiled.registers,
        compiled.shared,
        compiled.num_warps,
        occupancy(hw, compiled.registers, compiled.shared, compiled.num_warps),
        step,
        [lp for lp in tops if lp is not step],
        [i for i in instrs if i.addr not in covered and i.base not in ("EXIT", "BRA")],
        c,
        lanes,
        chunk,
        unroll,
    )


def _chunks(n: int, chunk: int) -> int:
    return -(-n // chunk)


def tensors_seconds(
    rec: Recording,
    models: dict[str, KernelModel],
    hw: Hardware,
    shapes: tuple[tuple[str, int, int], ...],
    io_bytes: int,
) -> tuple[float, float]:
    """(seconds to run ``rec``'s launch structure over ``shapes``, the share of the kernels'
    modelled cycles spent in prologues); see the module docstring."""
    counts: dict[str, int] = {}
    for launch in rec.launches:
        counts[launch.kernel] = counts.get(launch.kernel, 0) + 1
    sizes = [r * c for _, r, c in shapes]
    fixed = rec.block_syncs or 0
    syncs = fixed + (rec.host_syncs - fixed) / DRIVE_TENSORS * len(shapes)
    seconds = syncs * HOST_SYNC_US * 1e-6
    weights = sum(sizes)
    bytes_moved = weights * (rec.bytes_per_weight + io_bytes)
    device = prologues = 0.0
    for kernel, count in counts.items():
        m = models[kernel]
        drive_grid = sum(lch.grid for lch in rec.launches if lch.kernel == kernel)
        per_tensor = count >= DRIVE_TENSORS and count % DRIVE_TENSORS == 0
        groups = [[n] for n in sizes] if per_tensor else [sizes]
        repeats = count // DRIVE_TENSORS if per_tensor else count
        chunk = m.symbols_per_program
        drive_units = DRIVE_TENSORS * (_chunks(DRIVE_N, chunk) if chunk else DRIVE_N)
        for group in groups:
            units = sum(_chunks(n, chunk) for n in group) if chunk else sum(group)
            programs = max(1, round(drive_grid / drive_units * units))
            concurrent = hw.sms * max(m.ctas_per_sm, 1)
            # programs start as others end: a launch of more programs than fit at once takes
            # programs / resident ones program times (no whole-wave rounding: a wave's tail
            # overlaps the next programs)
            waves = max(1.0, programs / concurrent)
            warps = min(m.ctas_per_sm, programs / hw.sms) * m.num_warps
            counts_ = [_chunks(n, chunk) if chunk else 1 for n in group]
            mean_index = sum(k * (k - 1) / 2 for k in counts_) / max(1, sum(counts_))
            cycles, _, prologue = m.program_cycles(hw, warps, mean_index)
            device += repeats * (waves * cycles / (hw.ghz * 1e9) + LAUNCH_GAP_US * 1e-6)
            prologues += repeats * waves * prologue / (hw.ghz * 1e9)
    return seconds + max(device, bytes_moved / (hw.hbm_gbps * 1e9)), prologues / max(device, 1e-12)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return lines


def _with_old(value: float, key: str, old: dict[str, Any], fmt: str = "{:,.0f}") -> str:
    text = fmt.format(value)
    if key in old and fmt.format(old[key]) != text:
        text += f" (old {fmt.format(old[key])})"
    return text


def model_recording(
    rec: Recording, archs: list[int], args: argparse.Namespace, old: dict[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    """The report lines of one recording, and its figures keyed for the baseline."""
    lines = [f"### {rec.what} (MODEL)", ""]
    launched = " + ".join(f"{ln.kernel} (grid {ln.grid})" for ln in rec.launches)
    lines.append(f"recorded on a block of {DRIVE_TENSORS} x {DRIVE_N} weights: {launched}")
    lines.append(
        f"host round trips in the launchers: {rec.host_syncs}"
        + ("" if rec.block_syncs is None else f" ({rec.block_syncs} per block, not per tensor)")
        + "; "
        f"compressed bytes per weight: {rec.bytes_per_weight:.3f}"
    )
    figures: dict[str, Any] = {}
    kernel_rows, rate_rows = [], []
    specs = list({ln.kernel: ln.spec for ln in rec.launches}.values())
    io_bytes = 2  # bf16 out (decode) or in (encode)
    for arch in archs:
        hw = HARDWARE[arch]
        compiled = compile_kernels(specs, arch)
        models = {s.name: kernel_model(compiled[s.name], s, hw, args) for s in specs}
        for m in models.values():
            warps_full = m.warps_per_sm
            _, chain, _ = m.program_cycles(hw, warps_full)
            key = f"{rec.what}|sm_{arch}|{m.kernel}"
            step = m.step
            ins = round(len(step.body) / m.unroll) if step else 0
            figures[f"{key}|instructions"] = ins
            per_step = chain.cycles / m.unroll if chain else 0
            figures[f"{key}|chain"] = per_step
            on_chain = (
                ", ".join(
                    f"{k} {v / m.unroll:.0f}"
                    for k, v in sorted(chain.stalls.items(), key=lambda kv: -kv[1])
                )
                if chain
                else "-"
            )
            cls = classes(step.body) if step else {}
            kernel_rows.append(
                {
                    "arch": f"sm_{arch}",
                    "kernel": m.kernel,
                    "instr/step": _with_old(ins, f"{key}|instructions", old),
                    "classes": " ".join(f"{k}:{v / m.unroll:.3g}" for k, v in sorted(cls.items())),
                    "regs": m.registers,
                    "smem B": m.shared,
                    "warps/CTA": m.num_warps,
                    "occupancy warps/SM": f"{m.warps_per_sm} ({m.ctas_per_sm} CTAs)",
                    "steps/program": m.step_trips() * m.unroll if step else "-",
                    "chain cycles/step": _with_old(per_step, f"{key}|chain", old) if chain else "-",
                    "stalls on the chain (cycles)": on_chain,
                }
            )
        for label, shapes in (("Llama-3-8B layer", LLAMA3_8B_LAYER), ("lone k_proj", K_PROJ)):
            weights = sum(r * c for _, r, c in shapes)
            seconds, prologue = tensors_seconds(rec, models, hw, shapes, io_bytes)
            gbps = weights * 2 / seconds / 1e9
            key = f"{rec.what}|sm_{arch}|{label}|gbps"
            figures[key] = gbps
            per_block = {ln.kernel for ln in rec.launches}
            counts = [sum(1 for ln in rec.launches if ln.kernel == k) for k in per_block]
            launches = sum(
                c // DRIVE_TENSORS * len(shapes)
                if c >= DRIVE_TENSORS and c % DRIVE_TENSORS == 0
                else c
                for c in counts
            )
            chunk = next(
                (m.symbols_per_program for m in models.values() if m.symbols_per_program), 0
            )
            chunks = sum(_chunks(r * c, chunk) for _, r, c in shapes) if chunk else "-"
            rate_rows.append(
                {
                    "arch": f"sm_{arch} ({hw.name})",
                    "case": label,
                    "chunks": f"{chunks} of {chunk // 1024}K" if chunk else "-",
                    "launches": launches,
                    "time ms": f"{seconds * 1e3:.2f}",
                    "prologue share": f"{prologue:.0%}",
                    "GB/s bf16 (model)": _with_old(gbps, key, old),
                }
            )
    lines += ["", *_table(kernel_rows), "", *_table(rate_rows), ""]
    return lines, figures


CHUNK_SIZES = (65536, 32768, 16384, 8192)
TRADEOFF_LANES = (64,)  # lanes beside the default in the sub-stream table


def minilm_bits(chunk: int, lanes: int) -> float | None:
    """Lossless rANS bits per weight of MiniLM's matrices (bf16) at ``chunk`` symbols per chunk
    and ``lanes`` lanes, measured by compressing them on the host (None when the model package
    is missing)."""
    import torch

    from neuzip_offload import bundled, codec
    from neuzip_offload.config import CodecConfig

    try:
        mats = bundled.matrices(bundled.minilm_state_dict())
    except (ImportError, FileNotFoundError):
        return None
    tensors = [m.to(torch.bfloat16) for m in mats.values()]
    cts = codec.compress_many(tensors, CodecConfig(codec="ans", chunk_size=chunk, lanes=lanes))
    return sum(ct.nbytes for ct in cts) * 8 / sum(t.numel() for t in tensors)


def chunk_tradeoff(rec: Recording, args: argparse.Namespace) -> list[str]:
    """The decode kernel as compiled for ``rec`` (the default lanes) and for each of
    ``--tradeoff-lanes`` (64: two states per thread), at other chunk sizes (sub-streams): the
    modelled rates, the decode workspace of an 8B layer, and MiniLM's measured bits per weight."""
    from neuzip_offload.kernels import ans

    lines = ["### lanes and chunk size: more states per SM (MODEL, sm_90; bits MEASURED)", ""]
    hw = HARDWARE[90]
    recordings = {ans.DEFAULT_LANES: rec}
    for lanes in getattr(args, "tradeoff_lanes", TRADEOFF_LANES):
        if lanes not in recordings:
            recordings[lanes] = record_decode(Case("bf16 lossless", "lossless", lanes=lanes))
    rows = []
    for lanes, r in recordings.items():
        specs = list({ln.kernel: ln.spec for ln in r.launches}.values())
        compiled = compile_kernels(specs, 90)
        base = {s.name: kernel_model(compiled[s.name], s, hw, args) for s in specs}
        for chunk in CHUNK_SIZES:
            models = {k: replace(m, symbols_per_program=chunk) for k, m in base.items()}
            row: dict[str, Any] = {"lanes": lanes, "chunk": f"{chunk // 1024}K"}
            for label, shapes in (("Llama-3-8B layer", LLAMA3_8B_LAYER), ("lone k_proj", K_PROJ)):
                seconds, prologue = tensors_seconds(r, models, hw, shapes, 2)
                gbps = sum(rr * c for _, rr, c in shapes) * 2 / seconds / 1e9
                row[f"{label} GB/s (prologue share)"] = f"{gbps:,.0f} ({prologue:.0%})"
            chunks = sum(_chunks(rr * c, chunk) for _, rr, c in LLAMA3_8B_LAYER)
            row["8B layer workspace MB"] = f"{4 * ans.table_words(chunks) / 1e6:.1f}"
            bits = minilm_bits(chunk, lanes)
            row["MiniLM bits/weight"] = "-" if bits is None else f"{bits:.4f}"
            rows.append(row)
    return [*lines, *_table(rows), ""]


def assumptions() -> list[str]:
    lat = ", ".join(f"{k} {v}" for k, v in LATENCY.items())
    hws = "; ".join(
        f"sm_{a}: {h.name}, {h.sms} SMs, {h.ghz} GHz, {h.hbm_gbps:.0f} GB/s, "
        f"{h.max_warps} warps / {h.max_ctas} CTAs / {h.smem // 1024} KB smem per SM"
        for a, h in HARDWARE.items()
    )
    return [
        "All figures below are a MODEL (no GPU ran), built on these assumptions:",
        f"- latencies (cycles): {lat}",
        f"- hardware: {hws}",
        f"- launch gap {LAUNCH_GAP_US:.0f} us per launch; host round trip {HOST_SYNC_US:.0f} us",
        "- chain: one warp, in-order issue, 1 instr/cycle, waits for source registers; global "
        "loads: address from a warp op = word stream (L1), from a loaded value = table gather "
        "(L1 while the resident warps' tables fit, else L2), from the loop counter = plane "
        "stream (DRAM)",
        "- kernel rows: at full occupancy; a decoder's tables 2**PROB_BITS + 1024 bytes per "
        "program, the encoder's 257 x 8",
        "- the decoder's prologue (straight code, table-start walk, entries, slot fill) is "
        f"counted: {TABLE_ENTRIES} table entries per chunk, the slot fill charged its whole body "
        "per entry and per unrolled trip of run stores (an overestimate), its loads from L1; the "
        "encoder's too (CHUNK / HIST histogram tiles, 32 normalization bit-steps, whole chunks)",
        "- step = max(chain, resident warps x instructions / 4); kernel = max(1, programs / "
        "resident programs) x program; at least bytes moved / HBM bandwidth; torch ops between "
        "launches not modelled",
    ]


def run(args: argparse.Namespace) -> list[str]:
    import triton

    TRITON_PATH[:] = getattr(args, "triton_path", [])
    compiler = triton.__version__ if not TRITON_PATH else _worker_triton_version()
    old: dict[str, Any] = {}
    if args.baseline and Path(args.baseline).exists() and not args.write_baseline:
        old = json.loads(Path(args.baseline).read_text())["figures"]
    lines = [f"triton {compiler} compiles (launches recorded with {triton.__version__})"]
    lines += [*assumptions(), ""]
    recordings = [record_decode(DECODE_CASES[0])]
    if not args.quick:
        recordings += [record_decode(DECODE_CASES[1]), record_encode(DECODE_CASES[0])]
    figures: dict[str, Any] = {}
    for rec in recordings:
        more, figs = model_recording(rec, args.archs, args, old)
        lines += more
        figures.update(figs)
    if not args.quick and 90 in args.archs:
        lines += chunk_tradeoff(recordings[0], args)
    if args.write_baseline:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        Path(args.write_baseline).write_text(
            json.dumps({"commit": rev, "figures": figures}, indent=1, sort_keys=True) + "\n"
        )
        lines.append(f"baseline written to {args.write_baseline} (commit {rev})")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", type=int, nargs="+", default=[90, 89], choices=sorted(HARDWARE))
    p.add_argument("--quick", action="store_true", help="sm_90, the lossless decoder only")
    p.add_argument("--baseline", default=str(BASELINE), help="old figures to print beside")
    p.add_argument("--write-baseline", metavar="PATH", help="store this run's figures as old")
    p.add_argument(
        "--symbols-per-step",
        type=int,
        help="symbols one step-loop iteration codes per program (default: the LANES constexpr)",
    )
    p.add_argument(
        "--symbols-per-program",
        type=int,
        help="symbols one program codes (default: the CHUNK constexpr)",
    )
    p.add_argument(
        "--triton-path",
        action="append",
        default=[],
        help="compile with the Triton in this directory (e.g. pip install --target /tmp/t36 "
        "triton==3.6.0 --no-deps); launches are still recorded with the local one",
    )
    p.add_argument(
        "--tradeoff-lanes",
        type=int,
        nargs="+",
        default=list(TRADEOFF_LANES),
        help="lanes beside the default in the sub-stream table (powers of two up to 128)",
    )
    args = p.parse_args(argv)
    from neuzip_offload.config import CodecConfig
    from neuzip_offload.kernels import ans

    for lanes in args.tradeoff_lanes:
        try:
            CodecConfig(codec="ans", lanes=lanes)  # the codec's own rule for lanes
        except ValueError:
            p.error(f"--tradeoff-lanes takes powers of two up to {ans.MAX_LANES}, got {lanes}")
    if args.quick:
        args.archs = [90]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuobjdump() is None:
        print("cuobjdump not found (triton/backends/nvidia/bin): nothing to model")
        return 2
    for line in run(args):
        print(line)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # python codec_model.py --worker JOB.json OUT_DIR
        _worker(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(main())
