"""Shared test setup.

Without CUDA, Triton kernels run in its interpreter (TRITON_INTERPRET=1, set before Triton is
imported), so every kernel is tested against its torch reference on any machine; with CUDA they
run compiled. Keep interpreter inputs small: the interpreter runs about 1 ms per program.
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
