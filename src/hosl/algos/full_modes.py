"""Unsplit references: `fo-full` (ordinary fine-tuning) and `zo-full` (plain MeZO).

They train the whole model in one place with the same data, loss and seeds as the split modes, so
any difference from `fo`/`zo` is the split's doing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from hosl.batching import Batch
from hosl.models.split import UnsplitPart
from hosl.parties.state import PartyState
from hosl.scoring import candidate_scores, classification_loss
from hosl.zo import (
    PerturbedForward,
    ZoRecords,
    ZoTarget,
    apply_zo_update_,
    pair_losses,
    perturbation_seed,
    projected_gradient,
)


@dataclass
class FullRunner(PartyState):
    part: UnsplitPart
    q: int
    eps: float
    zo_lr: Callable[[int], float]
    run_seed: int
    weight_decay: float = 0.0  # decoupled, as AdamW's: applied by the ZO update too
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def __post_init__(self) -> None:
        self.part.eval()
        self.zo = ZoTarget(self.part)

    def _scores(self, batch: Batch) -> torch.Tensor:
        hidden = self.part(batch.input_ids, batch.attention_mask)  # (S, L, H)
        return candidate_scores(hidden, self.part.head, batch.spec)  # (B, C)

    def loss(self, batch: Batch) -> torch.Tensor:
        return classification_loss(self._scores(batch), batch.spec.labels)

    @torch.inference_mode()
    def scores(self, batch: Batch) -> torch.Tensor:
        # zo-full computes in float32 whatever the parameters' dtype, as its estimates do
        with PerturbedForward(self.zo, None) if self.optimizer is None else nullcontext():
            return self._scores(batch).float()


def fo_full_step(run: FullRunner, micro_batches: Sequence[Batch], step: int) -> float:
    losses = []
    for batch in micro_batches:
        with run.phase("forward_backward"):
            loss = run.loss(batch)
            (loss / len(micro_batches)).backward()
            losses.append(loss.item())
    run.optimizer_step()
    return sum(losses) / len(losses)


def zo_full_step(run: FullRunner, micro_batches: Sequence[Batch], step: int) -> float:
    records = ZoRecords(run.q, len(micro_batches))
    losses = []
    for m, batch in enumerate(micro_batches):
        for q in range(run.q):
            seed = perturbation_seed(run.run_seed, step, m, q)
            with run.phase("zo_estimate"), torch.inference_mode():
                plus, minus = pair_losses(
                    run.zo, seed, run.eps, lambda _sign, batch=batch: run.loss(batch).item()
                )
            records.add(seed, projected_gradient(plus, minus, run.eps))
            losses.append((plus + minus) / 2)
    with run.phase("update"):
        apply_zo_update_(run.zo, records.records, run.zo_lr(step), run.weight_decay)
    return sum(losses) / len(losses)


FULL_STEPS = {"fo-full": fo_full_step, "zo-full": zo_full_step}
