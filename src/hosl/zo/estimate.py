"""One ZO estimate, shared by every mode that has a ZO side (`hosl`, `zo`, `zo-full`).

A step's estimate is the average over Q perturbation pairs of each of A accumulated
micro-batches: ĝ = (1 / (Q·A)) Σ g_i z_i with g_i = (L(θ + εz_i) − L(θ − εz_i)) / 2ε. Its record
is the list of (seed_i, g_i / (Q·A)), which is all that `apply_zo_update_` (or a replay) needs.
The 1/(Q·A) scaling lives here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hosl.zo.engine import PerturbedForward, ZoTarget


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """Central difference along z: g = (L(θ+εz) − L(θ−εz)) / 2ε."""
    return (loss_plus - loss_minus) / (2.0 * eps)


def directional_derivative(grad: Tensor, difference: Tensor, eps: float) -> float:
    """g = ⟨∂L/∂h, h⁺ − h⁻⟩ / 2ε: the cut-gradient estimator's projected gradient.

    grad and difference are (S, L, H); the sum runs in float64 (tens of thousands of terms).
    """
    return float(torch.dot(grad.reshape(-1).double(), difference.reshape(-1).double())) / (2 * eps)


def pair_losses(
    target: ZoTarget, seed: int, eps: float, loss_at: Callable[[int], float]
) -> tuple[float, float]:
    """(L⁺, L⁻): `loss_at(sign)` evaluated with `target` at θ + εz and at θ − εz (sign +1, −1).

    Both losses are taken at the same θ (nothing is updated in between): the fixed point a
    central difference needs.
    """
    with PerturbedForward(target, seed, +eps):
        plus = loss_at(+1)
    with PerturbedForward(target, seed, -eps):
        minus = loss_at(-1)
    return plus, minus


@dataclass
class ZoRecords:
    """The update of one step: (seed, g / (Q·A)) for each pair of each micro-batch."""

    q: int  # perturbation pairs per micro-batch
    micro_batches: int  # A: micro-batches accumulated into the step
    records: list[tuple[int, float]] = field(default_factory=list)

    def add(self, seed: int, g: float) -> None:
        self.records.append((seed, g / (self.q * self.micro_batches)))

    def add_losses(self, seeds: list[int], losses: list[float], eps: float) -> None:
        """Record Q pairs from their 2Q losses, ordered L⁺₁, L⁻₁, L⁺₂, L⁻₂, ..."""
        if len(losses) != 2 * len(seeds):
            raise ValueError(f"{len(seeds)} seeds need {2 * len(seeds)} losses, got {len(losses)}")
        for q, seed in enumerate(seeds):
            self.add(seed, projected_gradient(losses[2 * q], losses[2 * q + 1], eps))
