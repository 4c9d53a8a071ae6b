"""The one piece rule: how a large tensor is cut into row (or column) pieces.

Dispatch (cutting weights outside the layers) and the checkpoint converter (cutting tensors
into shard entries) both call :func:`cut`, so a checkpoint's pieces are the pieces dispatch
would make from the same limit, and ``load()`` can place them without compressing again. The
planner sizes the slots that stream such a weight from its largest piece, so a piece never
exceeds the limit unless a single row does.
"""

from __future__ import annotations

import math


def cut(length: int, nbytes: int, limit: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` along the cut dimension (``length`` rows) of a tensor of
    ``nbytes`` bytes.

    One piece (``[(0, length)]``) when ``limit`` is not positive, the tensor fits in it, or there
    is a single row. Otherwise the fewest pieces of at most ``max(limit, one row)`` bytes each,
    as equal as they can be: every piece has the same number of rows but the last, which may
    have fewer.
    """
    if limit <= 0 or nbytes <= limit or length < 2:
        return [(0, length)]
    # rows that fit in `limit`: k rows take k * nbytes / length bytes (exact in integers)
    rows = max(1, limit * length // nbytes)
    count = math.ceil(length / rows)
    step = math.ceil(length / count)  # <= rows, and still `count` pieces
    return [(a, min(a + step, length)) for a in range(0, length, step)]
