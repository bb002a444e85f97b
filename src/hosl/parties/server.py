"""The server: owns blocks k..N-1, the final norm and the output head, and trains them with FO.

Every method answers one message. Losses for ZO estimates are taken under inference mode at the
current parameters; the FO update only happens when a message says it ends the step, so all 2Q
losses of a step see the same θ_s (the fixed point the estimator needs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hosl.models.split import Activations, ServerPart
from hosl.parties.state import PartyState
from hosl.scoring import candidate_scores, classification_loss
from hosl.transport.messages import (
    CutBatch,
    EvalReply,
    EvalRequest,
    FoStepReply,
    FoStepRequest,
    HoslStepReply,
    HoslStepRequest,
    ZoStepReply,
    ZoStepRequest,
)
from hosl.zo import PerturbedForward, ZoTarget, apply_zo_update_, projected_gradient


class ServerParty(PartyState):
    def __init__(
        self,
        part: ServerPart,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        grad_accum: int = 1,
    ) -> None:
        self.part = part.eval()
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_accum = grad_accum
        self.zo = ZoTarget(part)
        self._pending_zo: list[tuple[int, float]] = []

    def _scores(self, hidden: Tensor, batch: CutBatch) -> Tensor:
        final = self.part(Activations(hidden, batch.attention_mask, batch.position_ids))
        return candidate_scores(final, self.part.head, batch.spec)  # (B, C)

    @torch.inference_mode()
    def _loss(self, hidden: Tensor, batch: CutBatch) -> float:
        with self.phase("zo_losses"):
            return classification_loss(self._scores(hidden, batch), batch.spec.labels).item()

    def _backward(
        self, hidden: Tensor, batch: CutBatch, want_input_grad: bool
    ) -> tuple[float, Tensor | None]:
        """Forward with a graph, backward into .grad (scaled for accumulation)."""
        with self.phase("forward_backward"):
            hidden = hidden.detach().requires_grad_(want_input_grad)
            loss = classification_loss(self._scores(hidden, batch), batch.spec.labels)
            (loss / self.grad_accum).backward()
            return loss.item(), hidden.grad

    def hosl_step(self, req: HoslStepRequest) -> HoslStepReply:
        losses = [self._loss(h, req.batch) for h in req.perturbed]  # all at the same θ_s
        loss, _ = self._backward(req.clean, req.batch, want_input_grad=False)
        if req.update:
            self.optimizer_step()
        return HoslStepReply(losses=losses, loss=loss)

    def fo_step(self, req: FoStepRequest) -> FoStepReply:
        loss, grad = self._backward(req.hidden, req.batch, want_input_grad=True)
        assert grad is not None
        if req.update:
            self.optimizer_step()
        return FoStepReply(loss=loss, grad=grad)

    def zo_step(self, req: ZoStepRequest) -> ZoStepReply:
        losses: list[float] = []
        grads: list[float] = []
        for q, seed in enumerate(req.seeds):
            with PerturbedForward(self.zo, seed, +req.eps):
                plus = self._loss(req.perturbed[2 * q], req.batch)
            with PerturbedForward(self.zo, seed, -req.eps):
                minus = self._loss(req.perturbed[2 * q + 1], req.batch)
            losses += [plus, minus]
            grads.append(projected_gradient(plus, minus, req.eps))
        scale = 1.0 / (len(req.seeds) * self.grad_accum)
        self._pending_zo += [(seed, g * scale) for seed, g in zip(req.seeds, grads)]
        if req.update:
            with self.phase("update"):
                apply_zo_update_(self.zo, self._pending_zo, req.lr)
            self._pending_zo = []
        return ZoStepReply(losses=losses, grads=grads)

    def discard_partial_step(self) -> None:
        """Forget what an unfinished step accumulated (gradients, pending ZO coefficients), so a
        step whose client vanished leaves the server exactly as before it."""
        self.part.zero_grad(set_to_none=True)
        self._pending_zo = []

    @torch.inference_mode()
    def evaluate(self, req: EvalRequest) -> EvalReply:
        with self.phase("eval"):
            return EvalReply(scores=self._scores(req.hidden, req.batch).float())
