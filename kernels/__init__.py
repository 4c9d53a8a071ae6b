"""Bit-level compute: plane split/merge, lossy pack/unpack, rANS and zstd exponent coders.

Each concept has a torch reference (the CPU path) and, where a GPU pays off, Triton kernels with
their launchers: planes.py and ans.py keep theirs in planes_triton.py, ans_triton.py (decoder;
its host-side tensor table is in ans_jobs.py) and ans_encode_triton.py (encoder), which share
lanes_triton.py's ballot ranks; crc.py's short kernel sits beside its reference. Nothing here
imports the rest of the project; Triton is optional.
"""

from __future__ import annotations

import os

try:  # Triton is optional: the torch references run everywhere.
    import triton
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``), as the tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
