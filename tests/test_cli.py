"""The neuzip-offload command: user errors end in one line on stderr and a non-zero exit, the
library's advice in the command's flags; bugs keep their traceback; CPU plans show decode time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload import bundled, cli
from neuzip_offload.checkpoint import INDEX_NAME
from tests.helpers import tiny_llama

REPO = Path(__file__).resolve().parents[1]
# the library's way of naming an argument; the command must say --flag instead
PYTHON_ADVICE = re.compile(r"\b(" + "|".join(cli.FLAGS) + r")=|neuzip_offload\.")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama, compressed by the command (zstd: quick on a CPU)."""
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "hf", max_shard_size="100KB")
    assert cli.main(["compress", str(root / "hf"), str(root / "nz"), "--codec", "zstd"]) == 0
    return root / "nz"


def _refused(capsys, argv: list[str], code: int = 1) -> str:
    """Run the command, expect it to refuse with exit ``code``; the one line it printed."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    # a progress bar (verify, compress) may come before it, on lines of its own
    lines = [line for line in err.split("\n") if line and "\r" not in line and "%|" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err and err.endswith(lines[0] + "\n")
    assert lines[0].startswith("neuzip-offload")
    assert not PYTHON_ADVICE.search(lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["plan", ".", "--max-gpu-mem", "8XB"], "unknown unit 'XB'"),
        (["plan", ".", "--max-gpu-mem", "8Gb"], "is in bits; did you mean '8GB'"),
        (["plan", ".", "--max-gpu-mem", "8GB", "--max-cpu-mem", "lots"], "'lots' is not a size"),
        (["plan", ".", "--max-gpu-mem", "8GB", "--reserve", "1 parsec"], "unknown unit"),
        (["plan", ".", "--max-gpu-mem", "8GB", "--device", "gpu"], "'gpu' is not a device"),
        (["plan", "."], "the following arguments are required: --max-gpu-mem"),
        (["plan", ".", "--max-gpu-mem", "8GB", "--bogus"], "unrecognized arguments: --bogus"),
        (["plan", ".", "--max-gpu-mem", "8GB", "--prefetch", "two"], "invalid int value"),
        (["demo", "--max-gpu-mem", "abc%"], "expected e.g. 40%, 8GB or 512MiB"),
        (["compress", "a", "b", "--max-piece-bytes", "1 parsec"], "unknown unit"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_flags_are_one_line_with_exit_2(capsys, argv, words):
    line = _refused(capsys, argv, code=2)
    assert words in line and "--help" in line


def test_sizes_take_floats_and_percentages_are_checked(capsys):
    assert cli._size_arg("8e9") == "8e9" and cli._size_arg("7.5GB") == "7.5GB"
    assert cli._budget("40%") == pytest.approx(0.4)
    assert cli._reserve_arg("none") is None and cli._reserve_arg("auto") == "auto"
    _refused(capsys, ["demo", "--max-gpu-mem", "-5%"], code=2)


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "/no/such/dir", "--max-gpu-mem", "8GB"],
        ["inspect", "/no/such/dir"],
        ["compress", "/no/such/dir", "/tmp/never-written"],
    ],
)
def test_a_missing_path_is_named(capsys, argv):
    assert "/no/such/dir: no such file or directory" in _refused(capsys, argv)


def test_paths_that_are_not_what_the_command_takes(capsys, tmp_path):
    assert "no config.json; pass a neuzip checkpoint" in _refused(
        capsys, ["plan", str(tmp_path), "--max-gpu-mem", "8GB"]
    )
    (tmp_path / "config.json").write_text("{not json")
    assert "is not valid JSON" in _refused(capsys, ["plan", str(tmp_path), "--max-gpu-mem", "8GB"])
    assert "is not a neuzip checkpoint" in _refused(capsys, ["inspect", str(tmp_path)])


def test_a_damaged_checkpoint_is_one_line(capsys, checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    shard = max(bad.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # a byte of the last tensor's data
    shard.write_bytes(bytes(data))
    assert "checksum" in _refused(capsys, ["inspect", str(bad)])
    shard.write_bytes(bytes(data[: len(data) // 2]))
    assert "truncated" in _refused(capsys, ["inspect", str(bad)])
    (bad / INDEX_NAME).write_text("{damaged")
    assert "damaged index" in _refused(capsys, ["inspect", str(bad)])
    assert "damaged index" in _refused(capsys, ["plan", str(bad), "--max-gpu-mem", "8GB"])


def test_a_budget_too_small_says_which_flags_to_change(capsys, checkpoint):
    line = _refused(
        capsys,
        [
            "plan",
            str(checkpoint),
            "--max-gpu-mem",
            "1KB",
            "--max-cpu-mem",
            "1GB",
            "--device",
            "cpu",
        ],
    )
    assert line.startswith("neuzip-offload: error: --max-gpu-mem 1000 B is too small")
    assert "raise --max-gpu-mem, lower --prefetch or --reserve" in line
    # the flags it names exist and are taken: a smaller reserve and prefetch make it fit
    assert (
        cli.main(
            [
                "plan",
                str(checkpoint),
                "--max-gpu-mem",
                "400KB",
                "--max-cpu-mem",
                "1GB",
                "--device",
                "cpu",
                "--reserve",
                "none",
                "--prefetch",
                "0",
            ]
        )
        == 0
    )


def test_library_refusals_the_command_can_surface_are_put_in_flags():
    """Each refusal reached from the command's flags, as the library words it, translated."""
    messages = []
    for call in (
        lambda: nzo.plan_model(
            tiny_llama(), "100KB", max_cpu_mem="1KB", disk=False, device="cpu", reserve=None
        ),
        lambda: nzo.dispatch(tiny_llama(), "1KB", device="cpu", progress=False),
        lambda: nzo.plan_model(tiny_llama(), "8GB", prefetch=-1),
        lambda: nzo.plan_model(tiny_llama(), "8GB", decode_gbps=-1),
        lambda: nzo.plan_model(tiny_llama(), "8GB", pcie_gbps=0),
        lambda: nzo.plan_model(tiny_llama(), "8GB", reserve="x"),
        lambda: nzo.dispatch(tiny_llama(), "8GB", mode="lossy", mantissa_bits=9, device="cpu"),
        lambda: nzo.compress(torch.tensor([float("inf")]), mode="lossy"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        messages.append(str(e.value))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError) as e:
            nzo.dispatch(tiny_llama(), "8GB", device="cuda")
        messages.append(str(e.value))
    for message in messages:
        line = cli.in_flags(message)
        assert "\n" not in line
        assert not PYTHON_ADVICE.search(line), (message, line)
        assert "--" in line, (message, line)  # it names the flag to change
    assert "(raise --max-cpu-mem)" in cli.in_flags(messages[0])
    assert cli.in_flags("device='cuda', but CUDA is not available") == (
        "--device cuda, but CUDA is not available"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_demo_on_cuda_without_cuda_says_so(capsys):
    line = _refused(capsys, ["demo", "--device", "cuda"])
    assert "CUDA is not available" in line and "--device cpu" in line
    assert capsys.readouterr().out == ""  # refused before loading the model


def test_debug_shows_the_traceback_and_bugs_keep_it(monkeypatch, capsys):
    # --debug: the refusal is raised, with its traceback
    with pytest.raises(cli.UsageError, match="no such file or directory"):
        cli.main(["--debug", "inspect", "/no/such/dir"])

    def bug(path):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "Checkpoint", bug)
    with pytest.raises(KeyError, match="a bug"):  # not a user error: not turned into a line
        cli.main(["inspect", str(REPO)])


def test_errors_leave_the_process_as_one_line_and_a_status():
    """The same through `python -m neuzip_offload`: stderr, status, no traceback; --debug has it."""
    argv = [sys.executable, "-m", "neuzip_offload", "plan", "/no/such", "--max-gpu-mem", "8GB"]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "neuzip-offload: error: /no/such: no such file or directory\n"
    r = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_a_cpu_plan_prints_its_decode_time(capsys, checkpoint):
    """On the CPU nothing crosses PCIe: the bound is decoding, not 0 ms."""
    argv = ["plan", str(checkpoint), "--max-gpu-mem", "400KB", "--max-cpu-mem", "1GB"]
    assert cli.main([*argv, "--device", "cpu", "--reserve", "none", "--prefetch", "0"]) == 0
    out = capsys.readouterr().out
    bound = float(re.search(r"lower bound ([0-9.]+) ms \(decoding ([0-9.]+) ms", out)[1])
    assert bound > 0
    assert "PCIe" not in out.split("lower bound")[1].splitlines()[0]  # no copies on a CPU
    assert float(re.search(r"lower bound ([0-9.]+) s/token", out)[1]) == pytest.approx(
        bound / 1e3, abs=1e-3
    )
    p = nzo.plan_model(tiny_llama(), "400KB", max_cpu_mem="1GB", device="cpu", reserve=None)
    assert p.seconds_lower_bound() == 0  # transfers alone
    assert p.seconds_bound() == p.seconds_decoding() > 0
    assert p.seconds_decoding() == pytest.approx(
        p.decoded_bytes_per_forward / (p.options.decode_gbps * 1e9)
    )


def test_a_budget_beyond_the_machine_is_a_warning_in_one_line(capsys, tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(bundled.LLAMA3_70B_CONFIG))
    argv = ["plan", str(tmp_path / "cfg"), "--max-gpu-mem", "8GB", "--max-cpu-mem", "1000TB"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines, "no warning"
    for line in lines:  # one line per warning, the size given and the machine's
        assert line.startswith("neuzip-offload: warning: --max-cpu-mem 909.49 TiB is more than")
        assert re.search(r"this machine's memory \([0-9.]+ GiB\)", line), line
