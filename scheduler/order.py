"""The order in which blocks run, per phase, and the prefetch window that follows from it.

The first forward is recorded as it runs; until then module order predicts it (and backward's
is predicted as the forward's reversed, until the first backward is recorded). A cursor follows
the blocks entered in the current pass; the window is the next ``count`` blocks after it, and
once a phase's order is known the window wraps around, so the end of one forward prefetches the
start of the next. Pure bookkeeping over block indices: no tensors, no devices, no I/O.
"""

from __future__ import annotations

PHASES = ("forward", "backward")


class OrderTracker:
    """Orders recorded per phase, the phase running now and the cursor into its order."""

    def __init__(self, n_blocks: int, routed: set[int] | frozenset[int] = frozenset()):
        # module order, without the experts of MoE layers: they run only when routed
        self.static_order = [b for b in range(n_blocks) if b not in routed]
        self.orders: dict[str, list[int] | None] = dict.fromkeys(PHASES)
        self.phase = "forward"
        self._recording: list[int] | None = None
        self._cursor = 0

    def begin(self, phase: str) -> None:
        """A pass of ``phase`` starts: its order is recorded if none was yet."""
        self.phase = phase
        self._cursor = 0
        self._recording = [] if self.orders[phase] is None else None

    def end(self, phase: str) -> list[int] | None:
        """A pass of ``phase`` ended: the order it recorded (None if it recorded none, or if
        another phase is running). After a backward, forward is the phase again."""
        recorded = None
        if self._recording is not None and self.phase == phase:
            recorded = self.orders[phase] = self._recording
        self._recording = None
        if phase == "backward":
            self.phase = "forward"
        return recorded

    def abandon(self) -> None:
        """The pass running now failed: it records nothing, and forward is the phase again."""
        self._recording = None
        self.phase = "forward"
        self._cursor = 0

    def predicted(self) -> list[int]:
        """This phase's order: recorded, or predicted (module order; backward: reversed)."""
        if self.orders[self.phase] is not None:
            return self.orders[self.phase]
        forward = self.orders["forward"] or self.static_order
        return forward[::-1] if self.phase == "backward" else forward

    def advance(self, b: int) -> None:
        """Block ``b`` was entered in order: record it, and move the cursor past its next place
        in the order (or its first, when the pass went back; unchanged if it has none)."""
        if self._recording is not None:
            self._recording.append(b)
        order = self.predicted()
        try:
            pos = order.index(b, self._cursor)
        except ValueError:
            pos = order.index(b) if b in order else None
        if pos is not None:
            self._cursor = pos + 1

    def window(self, count: int) -> list[int]:
        """The next ``count`` blocks of the order (each at most once)."""
        order = self.predicted()
        if self.orders[self.phase] is None or not order:
            return order[self._cursor : self._cursor + count]
        n = len(order)
        return [order[(self._cursor + i) % n] for i in range(min(count, n))]
