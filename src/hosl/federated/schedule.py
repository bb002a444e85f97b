"""Which client takes which training step: a pure function of (seed, step), so a resumed run
sees the same clients in the same order with no schedule state to save.

Steps are grouped in rounds of m = max(1, round(fraction · N)) client steps. `round-robin` takes
clients (r·m + j) mod N for j = 0 … m − 1 in round r, so every client steps equally often;
`sampled` draws m distinct clients uniformly (seeded by the round), in the drawn order.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hosl.zo.seeds import tensor_seed

ORDERS = ("round-robin", "sampled")


@dataclass(frozen=True)
class ClientSchedule:
    n: int
    order: str = "round-robin"
    fraction: float = 1.0
    seed: int = 0

    @property
    def per_round(self) -> int:
        return max(1, min(self.n, round(self.fraction * self.n)))

    def round_clients(self, r: int) -> tuple[int, ...]:
        """The clients of round r, in the order they step."""
        return _round_clients(self.n, self.order, self.per_round, self.seed, r)

    def client_at(self, step: int) -> int:
        r, j = divmod(step, self.per_round)
        return self.round_clients(r)[j]

    def rounds(self, steps: int) -> int:
        """Rounds begun by `steps` steps."""
        return -(-steps // self.per_round)

    def local_step(self, step: int) -> int:
        """How many steps `client_at(step)` took before `step`: the index of its own batch."""
        if self.order == "round-robin":
            # step s goes to client (r·m + j) mod N = s mod N, whatever m
            return step // self.n
        # a round holds each client at most once: count the earlier rounds that hold it
        r = step // self.per_round
        return _rounds_of(self.n, self.order, self.per_round, self.seed).count(
            self.client_at(step), r
        )


@lru_cache(maxsize=4096)
def _round_clients(n: int, order: str, m: int, seed: int, r: int) -> tuple[int, ...]:
    # a tuple: the cache hands the same object to every caller, who must not change it
    if order == "round-robin":
        return tuple((r * m + j) % n for j in range(m))
    rng = np.random.default_rng(tensor_seed(seed, f"clients-round-{r}"))
    return tuple(int(c) for c in rng.choice(n, size=m, replace=False))


class _Appearances:
    """For each client, the rounds that hold it (ascending), drawn once, as far as asked:
    `local_step` over a run's steps costs O(steps) draws in all, not O(steps²)."""

    def __init__(self, n: int, order: str, m: int, seed: int) -> None:
        self.key = (n, order, m, seed)
        self.rounds: dict[int, list[int]] = {}  # client -> the rounds it steps in, ascending
        self.drawn = 0  # rounds 0..drawn-1 are in `rounds`
        self.lock = threading.Lock()

    def count(self, client: int, r: int) -> int:
        """How many of rounds 0..r-1 hold `client`."""
        with self.lock:
            while self.drawn < r:
                for c in _round_clients(*self.key, self.drawn):
                    self.rounds.setdefault(c, []).append(self.drawn)
                self.drawn += 1
            return bisect_left(self.rounds.get(client, []), r)


@lru_cache(maxsize=16)
def _rounds_of(n: int, order: str, m: int, seed: int) -> _Appearances:
    return _Appearances(n, order, m, seed)
