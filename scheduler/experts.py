"""The experts of mixture-of-experts models, as the executor meets them: which blocks are
routed, the guesses for the next layer, and the counters behind ``stats["experts"]``.

An expert block is entered only when its layer's router picks it (data-dependent: it never
joins the recorded order). The executor keeps a pool of decoded slots per experts module (the
plan's ``expert_slots``) and a few working slots all MoE layers share (``expert_shared_slots``),
evicting the least recently used of the two; this file is its bookkeeping. A guess
(``speculate``) fetches the experts the next layer will probably need into that layer's pool; a
guess is *right* when the expert is then routed, and a *miss avoided* when it was fetched by the
guess and found in its slot at its use.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import DEVICE, Plan

SHARED = "*"  # the working slots every MoE layer may use beside its own pool


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
    guessed_layer_uses: int = 0  # uses in a layer a guess was made for
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
            # precision (guesses that were routed) and recall (routed experts that were guessed)
            "guess_accuracy": self.guessed_right / max(self.guessed, 1),
            "guess_recall": self.guessed_right / max(self.guessed_layer_uses, 1),
            "prefetched": self.prefetched,
            "misses_avoided": self.misses_avoided,
        }


class Experts:
    """Per block: its experts module, which names its pool (None: not an expert). The guess
    for the next MoE layer (``guess``), and, once a layer's router has spoken (``routed``), the
    guessed experts it does use, which eviction spares until they run."""

    def __init__(self, plan: Plan):
        self.routed = [b.routed is not None for b in plan.blocks]
        self.pool = [b.routed for b in plan.blocks]
        self.stats = ExpertStats()
        self._guess: tuple[str | None, set[int]] | None = None  # (its layer, its blocks)
        self._running: set[int] = set()  # guessed right, about to run in the current layer
        self._ahead: set[int] = set()  # fetched by a guess, not used yet

    @staticmethod
    def pools(plan: Plan) -> list[tuple[str, int]]:
        """The pools to allocate, (name, slots): each MoE layer's, then the shared working
        slots; none when every expert is resident decoded."""
        streamed = [b.routed for b, t in zip(plan.blocks, plan.tiers, strict=True) if t != DEVICE]
        groups = [g for g in dict.fromkeys(streamed) if g is not None]
        if not groups:
            return []
        sizes = {g: 0 for g in groups}
        for b in plan.blocks:
            if b.routed in sizes:
                sizes[b.routed] += 1
        own = [(g, min(plan.expert_slots, sizes[g])) for g in groups if plan.expert_slots]
        return [*own, (SHARED, plan.expert_shared_slots)]

    def spared(self) -> set[int]:
        """Blocks eviction must not take: the live guess and the right guesses about to run."""
        return self._running | (self._guess[1] if self._guess else set())

    def routed_now(self, blocks: list[int]) -> None:
        """A MoE layer's router picked ``blocks``: the guess made for this layer is scored
        (right: guessed and routed), its wrong part is no longer spared."""
        pool = self.pool[blocks[0]] if blocks else None
        if self._guess is not None and self._guess[0] == pool:
            picked = set(blocks)
            self._running = self._guess[1] & picked
            self.stats.guessed_right += len(self._running)
            self.stats.guessed_layer_uses += len(picked)
            self._guess = None
        else:
            self._running = set()

    def new_guess(self, pool: str | None) -> None:
        """A guess for the layer ``pool`` begins (an earlier one, never scored, is dropped)."""
        self._guess = (pool, set())

    def add_guess(self, b: int, fetched: bool, decoded_bytes: int) -> None:
        self.stats.guessed += 1
        self._guess[1].add(b)
        if fetched:
            self._ahead.add(b)
            self.stats.prefetched += 1
            self.stats.decoded_bytes += decoded_bytes

    def used(self, b: int, cached: bool) -> None:
        """Block ``b`` is entered (``cached``: decoded already, in a slot or resident)."""
        s = self.stats
        s.uses += 1
        self._running.discard(b)
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
