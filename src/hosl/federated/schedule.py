"""Which client takes which training step: a pure function of (seed, step), so a resumed run
sees the same clients in the same order with no schedule state to save.

Steps are grouped in rounds of m = max(1, round(fraction · N)) client steps. `round-robin` takes
clients (r·m + j) mod N for j = 0 … m − 1 in round r, so every client steps equally often;
`sampled` draws m distinct clients uniformly (seeded by the round), in the drawn order.
"""

from __future__ import annotations

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

    def round_clients(self, r: int) -> list[int]:
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
        client = self.client_at(step)
        if self.order == "round-robin" and self.per_round == self.n:
            return step // self.n  # every round holds every client once
        return sum(self.client_at(s) == client for s in range(step))


@lru_cache(maxsize=4096)
def _round_clients(n: int, order: str, m: int, seed: int, r: int) -> list[int]:
    if order == "round-robin":
        return [(r * m + j) % n for j in range(m)]
    rng = np.random.default_rng(tensor_seed(seed, f"clients-round-{r}"))
    return [int(c) for c in rng.choice(n, size=m, replace=False)]
