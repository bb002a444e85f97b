"""The edge client: owns the data, the embeddings and blocks 0..k-1.

In `hosl` and `zo` modes it only ever runs forward passes under `torch.inference_mode()`: no graph,
no stored activations, no gradients, no optimizer state. In `fo` mode it runs an ordinary forward
with a graph and a backward from the gradient the server returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hosl.batching import Batch
from hosl.models.split import Activations, ClientPart
from hosl.parties.state import PartyState
from hosl.zo import PerturbedForward, ZoTarget, apply_zo_update_


class ClientParty(PartyState):
    def __init__(
        self,
        part: ClientPart,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.part = part.eval()  # dropout stays off: ZO differences must see one function
        self.zo = ZoTarget(part)
        self.optimizer = optimizer
        self.scheduler = scheduler

    @torch.inference_mode()
    def activations(self, batch: Batch, seed: int | None = None, scale: float = 0.0) -> Activations:
        """h = f_c(x) at θ_c, or at θ_c + scale·z(seed) when a seed is given."""
        if seed is None:
            with self.phase("forward"):
                return self.part(batch.input_ids, batch.attention_mask)
        with self.phase("zo_estimate"), PerturbedForward(self.zo, seed, scale):
            return self.part(batch.input_ids, batch.attention_mask)

    def perturbed_pairs(self, batch: Batch, seeds: Sequence[int], eps: float) -> list[Tensor]:
        """[h⁺₁, h⁻₁, h⁺₂, h⁻₂, ...]: 2Q hidden states (S, L, H), all around the same θ_c."""
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
