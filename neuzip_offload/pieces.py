"""The one piece rule: how a large tensor is cut into row (or column) pieces.

Dispatch (cutting weights outside the layers) and the checkpoint converter (cutting tensors
into shard entries) both call :func:`cut`, so a checkpoint's pieces are the pieces dispatch
would make from the same limit, and ``load()`` can place them without compressing again.
"""

from __future__ import annotations

import math


def cut(length: int, nbytes: int, limit: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` along the cut dimension of a tensor of ``nbytes`` bytes.

    One piece (``[(0, length)]``) when ``limit`` is not positive, the tensor fits in it, or
    there is a single row; otherwise the fewest equal pieces (the last may be shorter) of at
    most ``limit`` bytes each, never more pieces than rows.
    """
    if limit <= 0 or nbytes <= limit or length < 2:
        return [(0, length)]
    count = min(length, math.ceil(nbytes / limit))
    step = math.ceil(length / count)
    return [(a, min(a + step, length)) for a in range(0, length, step)]
