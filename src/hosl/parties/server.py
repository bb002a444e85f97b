"""The server: owns blocks k..N-1, the final norm and the output head, and trains them with FO.

Every method answers one message. Losses for ZO estimates are taken under inference mode at the
current parameters; the FO update only happens when a message says it ends the step, so all 2Q
losses of a step see the same θ_s (the fixed point the estimator needs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hosl.federated.records import ClientUpdate
from hosl.models.split import Activations, ServerPart
from hosl.parties.state import PartyState
from hosl.protocol import (
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
from hosl.scoring import candidate_scores, classification_loss
from hosl.zo import (
    PerturbedForward,
    ZoRecords,
    ZoTarget,
    apply_zo_update_,
    pair_losses,
    projected_gradient,
)


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
        self.dtype = next(part.parameters()).dtype  # parameters' storage (and FO compute) dtype
        self._zo_records: ZoRecords | None = None  # a ZO-ZO step's records until it ends
        # a ZO-ZO step's update as a record (as a ZO client's): all a replica of θ_s would need
        self.last_update: ClientUpdate | None = None

    def _scores(self, hidden: Tensor, batch: CutBatch) -> Tensor:
        final = self.part(Activations(hidden, batch.attention_mask, batch.position_ids))
        return candidate_scores(final, self.part.head, batch.spec)  # (B, C)

    @torch.inference_mode()
    def _loss(self, hidden: Tensor, batch: CutBatch) -> float:
        # float32 whatever the parameters' dtype: a ZO loss difference is ε-sized
        with self.phase("zo_losses"), PerturbedForward(self.zo, None):
            return classification_loss(self._scores(hidden, batch), batch.spec.labels).item()

    def _backward(
        self, hidden: Tensor, batch: CutBatch, want_input_grad: bool
    ) -> tuple[float, Tensor | None]:
        """Forward with a graph, backward into .grad (scaled for accumulation)."""
        with self.phase("forward_backward"):
            # the FO pass runs in the parameters' own dtype (float32 master weights in bf16 runs)
            hidden = hidden.detach().to(self.dtype).requires_grad_(want_input_grad)
            loss = classification_loss(self._scores(hidden, batch), batch.spec.labels)
            (loss / self.grad_accum).backward()
            return loss.item(), hidden.grad

    def hosl_step(self, req: HoslStepRequest) -> HoslStepReply:
        # req.perturbed holds h± − h (see hosl.protocol): h + (h± − h) rebuilds each h±
        losses = [self._loss(req.clean + delta, req.batch) for delta in req.perturbed]
        loss, _ = self._backward(req.clean, req.batch, want_input_grad=False)  # after: same θ_s
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
        if self._zo_records is None:
            self._zo_records = ZoRecords(len(req.seeds), self.grad_accum)
        losses: list[float] = []
        for q, seed in enumerate(req.seeds):

            def loss_at(sign: int, q: int = q) -> float:
                hidden = req.perturbed[2 * q]  # h⁺_q
                if sign < 0:
                    hidden = hidden + req.perturbed[2 * q + 1]  # h⁺_q + (h⁻_q − h⁺_q)
                return self._loss(hidden, req.batch)

            losses += pair_losses(self.zo, seed, req.eps, loss_at)
        grads = [
            projected_gradient(losses[2 * q], losses[2 * q + 1], req.eps)
            for q in range(len(req.seeds))
        ]
        for seed, g in zip(req.seeds, grads):
            self._zo_records.add(seed, g)
        if req.update:
            with self.phase("update"):
                apply_zo_update_(self.zo, self._zo_records.records, req.lr, req.weight_decay)
            self.last_update = ClientUpdate(
                step=req.step, client=-1, lr=req.lr, weight_decay=req.weight_decay,
                coefs=tuple((int(s), float(c)) for s, c in self._zo_records.records),
            )
            self._zo_records = None
        return ZoStepReply(losses=losses, grads=grads)

    def discard_partial_step(self) -> None:
        """Forget what an unfinished step accumulated (gradients, pending ZO coefficients), so a
        step whose client vanished leaves the server exactly as before it."""
        self.part.zero_grad(set_to_none=True)
        self._zo_records = None

    @torch.inference_mode()
    def evaluate(self, req: EvalRequest) -> EvalReply:
        with self.phase("eval"), PerturbedForward(self.zo, None):  # as the ZO losses: float32
            return EvalReply(scores=self._scores(req.hidden, req.batch).float())
