"""Every Triton kernel compiles for real GPUs (sm_80, 86, 89, 90) with Triton's compiler.

The interpreter alone accepts code the compiler refuses. tests/conftest.py records every launch of
the session (kernels/aot.py) and runs this file last; the final test adds the launches of the
production settings (benchmarks/compile_kernels.py drives the codec's Triton paths) and compiles
each unique specialization in a fresh cache: the production ones for each architecture, the
others for the oldest and the newest (SESSION_ARCHS). The negative controls first show that the
machinery reports what it exists to catch.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import pytest
import torch

from neuzip_offload.kernels import HAS_TRITON
from tests.helpers import requires_triton

pytestmark = requires_triton

if HAS_TRITON:
    from neuzip_offload.kernels import aot
    from tests.kernels import broken_kernels as broken

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
# The launchers the production settings must reach (a guard that the driver drove them all).
PRODUCTION_KERNELS = {
    "_split_kernel",
    "_pack_kernel",
    "_lossy_split_kernel",
    "_encode_kernel",
    "_decode_kernel",
    "_merge_kernel",
}
# Specializations the tests alone launch (other constexprs and alignments of the same code)
# compile for the oldest and the newest architecture; the production ones for all of aot.ARCHS.
# Compiling every one for all four took ~7.5 of the suite's ~15 minutes.
SESSION_ARCHS = (80, 90)


def _compile_kernels_script():
    spec = importlib.util.spec_from_file_location(
        "bench_compile_kernels", ROOT / "benchmarks" / "compile_kernels.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# the recorder derives what the JIT derives
# ------------------------------------------------------------------------------------------


def test_recorder_specializes_like_the_jit():
    rec = aot.LaunchRecorder()
    x = torch.zeros(64, dtype=torch.float32)
    with rec.recording():
        broken.constexpr_global_kernel[(1,)](x, 64, BLOCK=64)  # aligned pointer, n % 16 == 0
        broken.constexpr_global_kernel[(1,)](x[1:], 33, BLOCK=32)  # 4-byte offset, odd n
        broken.constexpr_global_kernel[(1,)](x, 1, BLOCK=16)  # n == 1: a constexpr
        broken.constexpr_global_kernel[(1,)](x, 64, BLOCK=64)  # a repeat: not a new spec
    assert not rec.errors
    assert rec.launches == 4
    by_block = {dict(s.constexprs)["BLOCK"]: s for s in rec.specs()}
    assert len(by_block) == 3
    assert by_block[64].params == (
        ("x_ptr", "*fp32", "D"),
        ("n", "i32", "D"),
        ("BLOCK", "constexpr", ""),
    )
    assert by_block[32].params[:2] == (("x_ptr", "*fp32", ""), ("n", "i32", ""))
    assert by_block[16].params[1] == ("n", "constexpr", "")
    assert dict(by_block[16].constexprs) == {"n": 1, "BLOCK": 16}
    # ints past int32 widen as the JIT widens them; the launch itself still ran (x was written)
    big = aot._Specializer(broken.constexpr_global_kernel.fn, {})
    assert big.spec((x, 2**31), {"BLOCK": 64}).params[1] == ("n", "i64", "D")
    assert big.spec((x, 2**63), {"BLOCK": 64}).params[1] == ("n", "u64", "D")
    # the launches still ran: each added 1 to the first n elements of its view
    expected = torch.zeros(64)
    expected += 2
    expected[1:33] += 1
    expected[0] += 1
    assert torch.equal(x, expected)


def test_recorder_uninstalls_and_round_trips_specs():
    from triton.runtime import interpreter, jit

    before = (interpreter.InterpretedFunction.run, jit.JITFunction.run)
    rec = aot.LaunchRecorder()
    with rec.recording():
        assert interpreter.InterpretedFunction.run is not before[0]
        broken.constexpr_global_kernel[(1,)](torch.zeros(16), 16, BLOCK=16, num_warps=2)
    assert (interpreter.InterpretedFunction.run, jit.JITFunction.run) == before
    (spec,) = rec.specs()
    assert dict(spec.options) == {"num_warps": 2}
    assert aot.Spec.from_json(spec.to_json()) == spec


def test_ptxas_log_parsing():
    text = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    160 bytes stack frame, 96 bytes spill stores, 104 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 8192 bytes smem\n"
    )
    assert aot.parse_ptxas_log(text) == {"registers": 255, "spill_stores": 96, "spill_loads": 104}
    assert aot.parse_ptxas_log("")["registers"] is None


# ------------------------------------------------------------------------------------------
# negative controls: the machinery must report what it exists to catch
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controls(tmp_path_factory):
    """Launch the control kernels under the recorder (the interpreter runs them all), then
    compile them for sm_90 (one worker), with settings in this process's environment that would
    hide the errors: the workers must not inherit them."""
    rec = aot.LaunchRecorder()
    with rec.recording():
        x = torch.zeros(64)
        broken.global_int_kernel[(1,)](x, 64, BLOCK=64)
        broken.constexpr_global_kernel[(1,)](x, 64, BLOCK=64)
        rows = torch.ones(2, 32, dtype=torch.int32)
        acc = torch.zeros(32, dtype=torch.int32)
        broken.loop_type_change_kernel[(1,)](rows, acc, 2, BLOCK=32)
        big = torch.rand(2048)
        broken.spilling_kernel[(1,)](
            big, torch.empty_like(big), BLOCK=2048, num_warps=1, maxnreg=32
        )
    assert torch.all(x == 2.0) and torch.all(acc == 2)  # the interpreter ran every one of them
    assert not rec.errors
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", "1")
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("stale_cache")))
        report = aot.compile_specs(rec.specs(), archs=(90,))
    return {r.spec.name: r for r in report.results}


def test_a_plain_int_global_fails_to_compile(controls):
    r = controls["global_int_kernel"]
    assert not r.ok and r.arch == 90
    assert "NameError" in r.error and "MODE" in r.error


def test_a_loop_carried_type_change_fails_to_compile(controls):
    r = controls["loop_type_change_kernel"]
    assert not r.ok
    assert "Loop-carried variable acc" in r.error and "int64" in r.error


def test_spills_are_reported(controls):
    r = controls["spilling_kernel"]
    assert r.ok and r.registers is not None and r.registers <= 32
    assert r.spill_stores > 0 and r.spill_loads > 0


def test_a_sound_kernel_compiles_without_spills(controls):
    r = controls["constexpr_global_kernel"]
    assert r.ok, r.error
    assert r.registers and r.spills == 0


def test_a_plan_compiles_each_architecture_its_own_specs():
    rec = aot.LaunchRecorder()
    with rec.recording():
        x = torch.zeros(64)
        broken.constexpr_global_kernel[(1,)](x, 64, BLOCK=64)
        broken.constexpr_global_kernel[(1,)](x, 32, BLOCK=32)
    wide, narrow = rec.specs()
    report = aot.compile_plan({90: [wide], 80: [wide, narrow], 86: []})
    assert sorted((r.arch, dict(r.spec.constexprs)["BLOCK"]) for r in report.results) == [
        (80, 32),
        (80, 64),
        (90, 64),
    ]
    assert all(r.ok and r.registers for r in report.results), report.failures()


def test_a_kernel_that_cannot_be_imported_is_reported():
    spec = aot.Spec("no_such_module_xyz", "k", (("x", "*fp32", "D"),), (), ())
    report = aot.compile_specs([spec], archs=(80,))
    (r,) = report.results
    assert not r.ok and "no_such_module_xyz" in r.error


# ------------------------------------------------------------------------------------------
# the real kernels: what the session launched, plus the production settings
# ------------------------------------------------------------------------------------------


def _describe_failures(report) -> str:
    groups: dict[tuple[str, str], list] = {}
    for r in report.failures():
        groups.setdefault((r.spec.name, r.error), []).append(r)
    lines = []
    for (name, error), rs in groups.items():
        archs = ", ".join(sorted({f"sm_{r.arch}" for r in rs}))
        n_specs = len({r.spec for r in rs})
        lines.append(f"{name} ({n_specs} specializations) on {archs}: {error}")
    return "\n".join(lines)


def test_every_kernel_compiles_for_real_gpus(launch_recorder):
    """Runs last (conftest): the production settings compile for sm_80/86/89/90, and every
    other specialization launched in this session for the oldest and the newest of them
    (SESSION_ARCHS); the decode path does not spill."""
    script = _compile_kernels_script()
    rec = launch_recorder if launch_recorder is not None else aot.LaunchRecorder()
    session_specs = len(rec.specs())
    production_rec = aot.LaunchRecorder()
    started = time.perf_counter()
    with rec.recording(), production_rec.recording():
        launch_failures = script.drive_production_defaults()
    driven = time.perf_counter() - started
    assert not rec.errors, "launches not recorded:\n" + "\n".join(rec.errors)
    # the project's kernels; kernels defined in tests (negative controls) are not
    specs = [s for s in rec.specs() if not s.module.startswith("tests.")]
    production = set(production_rec.specs())
    missing = PRODUCTION_KERNELS - {s.name for s in production}
    assert not missing, f"the production settings never launched {sorted(missing)}"
    assert production <= set(specs)  # the session's recorder saw the drive too

    plan = {
        arch: specs if arch in SESSION_ARCHS else [s for s in specs if s in production]
        for arch in aot.ARCHS
    }
    report = aot.compile_plan(plan)
    log.info(
        "compile test: %d specializations (%d production, %d from the session), drive %.1f s, "
        "compile %.1f s",
        len(specs),
        len(production),
        session_specs,
        driven,
        report.seconds,
    )
    assert len(report.results) == sum(len(p) for p in plan.values())
    assert {r.arch for r in report.results if r.spec in production} == set(aot.ARCHS)
    problems = []
    if launch_failures:
        problems.append("launches that failed at the production settings:")
        problems += [f"  {f}" for f in launch_failures]
    if report.failures():
        problems.append(
            f"{len(report.failures())} of {len(report.results)} compiles failed "
            f"(triton {report.triton_version}):"
        )
        problems.append(_describe_failures(report))
    spills = report.spilling(script.DECODE_PATH)
    if spills:
        problems.append("register spills on the decode path:")
        problems += [
            f"  {r.spec.name} sm_{r.arch}: {r.spill_stores} B stored, {r.spill_loads} B loaded, "
            f"{r.registers} registers: {r.spec.describe()}"
            for r in spills
        ]
    assert not problems, "\n".join(problems)
