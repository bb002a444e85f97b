"""The edge client: owns the data, the embeddings and blocks 0..k-1.

In `hosl` and `zo` modes it only ever runs forward passes under `torch.inference_mode()`: no graph,
no stored activations, no gradients, no optimizer state. In `fo` mode it runs an ordinary forward
with a graph and a backward from the gradient the server returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from hosl.batching import Batch
from hosl.models.split import Activations, ClientPart
from hosl.parties.state import PartyState
from hosl.zo import PerturbedForward, ZoTarget, apply_zo_update_


class LazyPairs(Sequence[Tensor]):
    """[h⁺₁, h⁻₁, h⁺₂, ...] computed one forward pass at a time, when read.

    A streaming transport puts each activation on the wire as soon as its forward pass ends, so
    the server evaluates h⁺₁ while the client computes h⁻₁, and the client holds one perturbed
    activation at a time instead of 2Q. Nothing is cached: reading an element again runs its
    forward again (same seed, same θ_c: the same tensor), which is what a resend after a lost
    connection needs.
    """

    def __init__(self, party: ClientParty, batch: Batch, seeds: Sequence[int], eps: float) -> None:
        self._party, self._batch, self._seeds, self._eps = party, batch, list(seeds), eps

    def __len__(self) -> int:
        return 2 * len(self._seeds)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        q, sign = divmod(i % len(self), 2)
        scale = -self._eps if sign else self._eps
        return self._party.activations(self._batch, self._seeds[q], scale).hidden

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))


class ClientParty(PartyState):
    def __init__(
        self,
        part: ClientPart,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        lazy_pairs: bool = False,
    ) -> None:
        self.part = part.eval()  # dropout stays off: ZO differences must see one function
        self.zo = ZoTarget(part)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lazy_pairs = lazy_pairs  # see LazyPairs: for transports that stream each activation

    @torch.inference_mode()
    def activations(self, batch: Batch, seed: int | None = None, scale: float = 0.0) -> Activations:
        """h = f_c(x) at θ_c, or at θ_c + scale·z(seed) when a seed is given."""
        if seed is None:
            with self.phase("forward"):
                return self.part(batch.input_ids, batch.attention_mask)
        with self.phase("zo_estimate"), PerturbedForward(self.zo, seed, scale):
            return self.part(batch.input_ids, batch.attention_mask)

    def perturbed_pairs(
        self, batch: Batch, seeds: Sequence[int], eps: float
    ) -> Sequence[Tensor]:
        """[h⁺₁, h⁻₁, h⁺₂, h⁻₂, ...]: 2Q hidden states (S, L, H), all around the same θ_c.

        With `lazy_pairs`, a `LazyPairs` that runs each forward pass when its element is read.
        """
        if self.lazy_pairs:
            return LazyPairs(self, batch, seeds, eps)
        hidden: list[Tensor] = []
        for seed in seeds:
            hidden.append(self.activations(batch, seed, +eps).hidden)
            hidden.append(self.activations(batch, seed, -eps).hidden)
        return hidden

    def apply_zo(self, seeds_and_coefs: Sequence[tuple[int, float]], lr: float) -> None:
        with self.phase("update"):
            apply_zo_update_(self.zo, seeds_and_coefs, lr)

    # First-order split (mode `fo`) -------------------------------------------------------------

    def forward_with_graph(self, batch: Batch) -> Activations:
        with self.phase("forward"):
            return self.part(batch.input_ids, batch.attention_mask)

    def backward(self, acts: Activations, grad_hidden: Tensor) -> None:
        """Finish backpropagation through the client from ∂L/∂h (accumulates into .grad)."""
        with self.phase("backward"):
            acts.hidden.backward(grad_hidden.to(acts.hidden.dtype))
