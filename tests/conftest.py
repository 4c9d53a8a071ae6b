"""Shared test setup.

Without CUDA, Triton kernels run in its interpreter (TRITON_INTERPRET=1, set before Triton is
imported), so every kernel is tested against its torch reference on any machine; with CUDA they
run compiled. Keep interpreter inputs small: the interpreter runs about 1 ms per program.

Every Triton launch of the session is recorded (kernels/aot.py) and the compile test,
tests/kernels/test_compile.py, runs last so that it compiles what the other tests launched for
real GPUs.
"""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from neuzip_offload.kernels import HAS_TRITON

_COMPILE_TEST = "test_compile.py"
_recorder = None


def pytest_configure(config: pytest.Config) -> None:
    global _recorder
    if HAS_TRITON:
        from neuzip_offload.kernels import aot

        _recorder = aot.LaunchRecorder().install()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _recorder is not None:
        _recorder.uninstall()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The compile test last, so that it sees every launch of the session."""
    items.sort(key=lambda item: item.path.name == _COMPILE_TEST)  # stable: order kept otherwise


@pytest.fixture(scope="session")
def launch_recorder():
    """The session's LaunchRecorder (None without Triton)."""
    return _recorder
