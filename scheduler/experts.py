"""The experts of mixture-of-experts models, as the executor meets them: which blocks are
routed, the guesses for the next layer, and the counters behind ``stats["experts"]``.

An expert block is entered only when its layer's router picks it (data-dependent: it never
joins the recorded order). The executor keeps a pool of decoded slots per experts module (the
plan's ``expert_slots``), evicting the least recently used; this file is its bookkeeping. A guess
(``speculate``) fetches the experts the next layer will probably need into that layer's pool; a
guess is *right* when the expert is then routed, and a *miss avoided* when it was fetched by the
guess and found in its slot at its use.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import Plan


@dataclass
class ExpertStats:
    """Counters since dispatch: routed uses, found decoded (hits), fetched on demand, decoded
    bytes (on demand and ahead); guesses, right guesses, fetched ahead, misses avoided."""

    uses: int = 0
    hits: int = 0
    fetches: int = 0
    decoded_bytes: int = 0
    guessed: int = 0
    guessed_right: int = 0
    prefetched: int = 0
    misses_avoided: int = 0

    def report(self, forwards: int) -> dict[str, float]:
        """The counters, with per-forward figures and rates."""
        f = max(forwards, 1)
        return {
            "uses": self.uses,
            "hits": self.hits,
            "fetches": self.fetches,
            "decoded_bytes": self.decoded_bytes,
            "uses_per_forward": self.uses / f,
            "hits_per_forward": self.hits / f,
            "fetches_per_forward": self.fetches / f,
            "decoded_bytes_per_forward": self.decoded_bytes / f,
            "hit_rate": self.hits / max(self.uses, 1),
            "guessed": self.guessed,
            "guessed_right": self.guessed_right,
            "guess_accuracy": self.guessed_right / max(self.guessed, 1),
            "prefetched": self.prefetched,
            "misses_avoided": self.misses_avoided,
        }


class Experts:
    """Per block: its experts module (None: not an expert) and its slot pool (None: the regular
    slots, when the plan gives experts no pool of their own). Per pool: the guessed blocks not
    used yet, which eviction spares."""

    def __init__(self, plan: Plan):
        self.routed = [b.routed is not None for b in plan.blocks]
        self.pool = [b.routed if plan.expert_slots else None for b in plan.blocks]
        self.stats = ExpertStats()
        self._guesses: dict[str | None, set[int]] = {}
        self._ahead: set[int] = set()  # fetched by a guess, not used yet

    def groups(self, plan: Plan) -> list[str]:
        """The pools to allocate: experts modules with a block off the device."""
        streamed = (b.routed for b, t in zip(plan.blocks, plan.tiers, strict=True) if t != "device")
        return [g for g in dict.fromkeys(streamed) if g is not None] if plan.expert_slots else []

    def guessed(self, pool: str | None) -> set[int]:
        return self._guesses.get(pool, set())

    def new_guess(self, pool: str | None) -> None:
        """A new guess for ``pool``'s layer: the earlier one's unused blocks are not spared."""
        self._guesses[pool] = set()

    def add_guess(self, b: int, fetched: bool, decoded_bytes: int) -> None:
        self._guesses.setdefault(self.pool[b], set()).add(b)
        if fetched:
            self._ahead.add(b)
            self.stats.prefetched += 1
            self.stats.decoded_bytes += decoded_bytes

    def used(self, b: int, cached: bool) -> None:
        """Block ``b`` is entered (``cached``: decoded already, in a slot or resident)."""
        s = self.stats
        s.uses += 1
        guessed = self._guesses.get(self.pool[b], set())
        if b in guessed:
            s.guessed_right += 1
            guessed.discard(b)
        if cached:
            s.hits += 1
            s.misses_avoided += b in self._ahead
        self._ahead.discard(b)

    def fetched(self, decoded_bytes: int) -> None:
        """An expert fetched on demand (a miss)."""
        self.stats.fetches += 1
        self.stats.decoded_bytes += decoded_bytes

    def evicted(self, b: int) -> None:
        """A guess evicted before its use avoided nothing."""
        self._ahead.discard(b)
