"""Split modes: `hosl` (ZO client, FO server), `fo` (FO-FO) and `zo` (ZO-ZO).

Each `*_step` runs one optimizer step over `micro_batches` (gradient accumulation) and returns the
mean training loss. The client talks to the server only through the transport: one round trip per
micro-batch, whatever Q is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hosl.batching import Batch
from hosl.models.split import Activations, position_ids_from_mask
from hosl.parties.client import ClientParty
from hosl.transport.base import Transport
from hosl.transport.messages import (
    CutBatch,
    EvalRequest,
    FoStepRequest,
    HoslStepRequest,
    ZoStepRequest,
)
from hosl.zo import perturbation_seed, projected_gradient


@dataclass
class SplitRunner:
    client: ClientParty
    transport: Transport
    q: int
    eps: float
    zo_lr: Callable[[int], float]  # client (and ZO-server) learning rate at a step
    run_seed: int
    grad_accum: int = 1

    def seeds(self, step: int, micro: int) -> list[int]:
        return [perturbation_seed(self.run_seed, step, micro, q) for q in range(self.q)]

    def scores(self, batch: Batch) -> torch.Tensor:
        """Eval: client forward, server returns (B, C) candidate scores — never logits."""
        acts = self.client.activations(batch)
        return self.transport.evaluate(
            EvalRequest(batch=cut(batch, acts), hidden=acts.hidden)
        ).scores


def cut(batch: Batch, acts: Activations | None = None) -> CutBatch:
    """What the server needs besides hidden states; positions come from the mask alone."""
    if acts is None:
        mask = batch.attention_mask
        return CutBatch(attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        spec=batch.spec)
    return CutBatch(
        attention_mask=acts.attention_mask, position_ids=acts.position_ids, spec=batch.spec
    )


def hosl_step(run: SplitRunner, micro_batches: Sequence[Batch], step: int) -> float:
    pending: list[tuple[int, float]] = []  # (seed, projected gradient / (Q·A)): the whole update
    losses: list[float] = []
    last = len(micro_batches) - 1
    for m, batch in enumerate(micro_batches):
        seeds = run.seeds(step, m)
        perturbed = run.client.perturbed_pairs(batch, seeds, run.eps)  # 2Q × (S, L, H)
        clean = run.client.activations(batch)  # (S, L, H) at θ_c
        reply = run.transport.hosl_step(
            HoslStepRequest(
                step=step,
                micro=m,
                update=m == last,
                batch=cut(batch, clean),
                perturbed=perturbed,
                clean=clean.hidden,
            )
        )
        for q, seed in enumerate(seeds):
            g = projected_gradient(reply.losses[2 * q], reply.losses[2 * q + 1], run.eps)
            pending.append((seed, g / (run.q * len(micro_batches))))
        losses.append(reply.loss)
    run.client.apply_zo(pending, run.zo_lr(step))
    return sum(losses) / len(losses)


def fo_step(run: SplitRunner, micro_batches: Sequence[Batch], step: int) -> float:
    losses: list[float] = []
    last = len(micro_batches) - 1
    for m, batch in enumerate(micro_batches):
        acts = run.client.forward_with_graph(batch)
        reply = run.transport.fo_step(
            FoStepRequest(
                step=step,
                micro=m,
                update=m == last,
                batch=cut(batch, acts),
                hidden=acts.hidden.detach(),
            )
        )
        run.client.backward(acts, reply.grad)  # ∂L/∂h already carries the 1/A accumulation scale
        losses.append(reply.loss)
    run.client.optimizer_step()
    return sum(losses) / len(losses)


def zo_step(run: SplitRunner, micro_batches: Sequence[Batch], step: int) -> float:
    pending: list[tuple[int, float]] = []
    losses: list[float] = []
    last = len(micro_batches) - 1
    lr = run.zo_lr(step)
    for m, batch in enumerate(micro_batches):
        seeds = run.seeds(step, m)
        perturbed = run.client.perturbed_pairs(batch, seeds, run.eps)
        reply = run.transport.zo_step(
            ZoStepRequest(
                step=step,
                micro=m,
                update=m == last,
                lr=lr,
                eps=run.eps,
                seeds=seeds,
                batch=cut(batch),  # ZO-ZO needs no clean forward pass
                perturbed=perturbed,
            )
        )
        pending += [(seed, g / (run.q * len(micro_batches))) for seed, g in zip(seeds, reply.grads)]
        losses.append(sum(reply.losses) / len(reply.losses))
    run.client.apply_zo(pending, lr)
    return sum(losses) / len(losses)


SPLIT_STEPS = {"hosl": hosl_step, "fo": fo_step, "zo": zo_step}
