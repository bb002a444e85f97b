"""Split modes: `hosl` (ZO client, FO server), `fo` (FO-FO), `zo` (ZO-ZO) and `frozen` (a client
that never trains, FO server: the baseline a ZO client must beat).

Each `*_step` runs one optimizer step over `micro_batches` (gradient accumulation) and returns the
mean training loss. The client talks to the server only through the transport: one round trip per
micro-batch, whatever Q is.

`hosl` reads its client's projected gradients one of two ways (`zo.estimator`):

- `losses` (the paper's): the client sends the clean h and the 2Q perturbed ones; the server
  returns 2Q losses, and g_q = (L⁺_q − L⁻_q)/2ε.
- `cut-grad`: the client sends the clean h only and the server returns ∂L/∂h there (as in FO-FO),
  and the client reads g_q = ⟨∂L/∂h, h⁺_q − h⁻_q⟩/2ε itself. Both are central differences of the
  same directional derivative, through the client's blocks here and through the whole model
  there; they agree up to O(ε²). The wire carries one activation each way whatever Q is, the
  server runs one forward and one backward, and the perturbed activations never leave the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch

from hosl.batching import Batch
from hosl.models.split import Activations, position_ids_from_mask
from hosl.parties.client import ClientParty, LazyDeltas
from hosl.protocol import (
    CutBatch,
    EvalRequest,
    FoStepRequest,
    HoslStepRequest,
    ZoStepRequest,
)
from hosl.transport.base import Transport
from hosl.zo import ZoRecords, directional_derivative, perturbation_seed

T = TypeVar("T")
U = TypeVar("U")


def run_in_turn(first: Callable[[], T], second: Callable[[], U]) -> tuple[T, U]:
    """`first()` then `second()`: the in-process default of `SplitRunner.overlap`."""
    return first(), second()


def run_concurrently(first: Callable[[], T], second: Callable[[], U]) -> tuple[T, U]:
    """`first()` on a worker thread while `second()` runs here: a remote server's work (and the
    wait for it) overlaps the client's. Both must be independent; an error in either is raised."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(first)
        try:
            other = second()
        finally:
            done = pending.result()  # waits, and raises the server call's error first
        return done, other


@dataclass
class SplitRunner:
    client: ClientParty
    transport: Transport
    q: int
    eps: float
    zo_lr: Callable[[int], float]  # client (and ZO-server) learning rate at a step
    run_seed: int
    grad_accum: int = 1
    weight_decay: float = 0.0  # decoupled, as AdamW's: applied by the ZO updates too
    # Runs a server call and client work that does not depend on it: in turn in process, at the
    # same time where the server is another machine (see `hosl.remote`).
    overlap: Callable[[Callable[[], T], Callable[[], U]], tuple[T, U]] = run_in_turn

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
    records = ZoRecords(run.q, len(micro_batches))  # the client's whole update
    losses: list[float] = []
    last = len(micro_batches) - 1
    for m, batch in enumerate(micro_batches):
        seeds = run.seeds(step, m)
        clean = run.client.activations(batch)  # (S, L, H) at θ_c
        # 2Q × (S, L, H), lazy with a streaming transport (both of hosl's): each perturbed forward
        # runs when the transport sends its output, which is freed before the next one runs, so
        # the client holds the clean h and one perturbed activation beyond inference.
        deltas = run.client.perturbed_deltas(batch, seeds, run.eps, clean.hidden)
        reply = run.transport.hosl_step(
            HoslStepRequest(
                step=step,
                micro=m,
                update=m == last,
                batch=cut(batch, clean),
                perturbed=deltas,
                clean=clean.hidden,
            )
        )
        if isinstance(deltas, LazyDeltas):
            deltas.look_up_unread_rows()
        records.add_losses(seeds, reply.losses, run.eps)
        losses.append(reply.loss)
    run.client.apply_zo(records.records, run.zo_lr(step), run.weight_decay)
    return sum(losses) / len(losses)


def hosl_cut_grad_step(run: SplitRunner, micro_batches: Sequence[Batch], step: int) -> float:
    records = ZoRecords(run.q, len(micro_batches))
    losses: list[float] = []
    last = len(micro_batches) - 1
    # A remote server answers while the client computes its Q differences (all held until the
    # answer comes). In process nothing runs beside the server call, so each pair's forwards run
    # when its derivative is taken: the client holds ∂L/∂h, h⁺_q and h⁻_q at most, whatever Q is.
    beside_server = run.overlap is not run_in_turn
    for m, batch in enumerate(micro_batches):
        seeds = run.seeds(step, m)
        clean = run.client.activations(batch)  # (S, L, H) at θ_c
        request = FoStepRequest(
            step=step, micro=m, update=m == last, batch=cut(batch, clean), hidden=clean.hidden
        )
        del clean  # the request holds h until it is sent
        # The client's 2Q forwards need nothing from the server: they may run while it answers.
        reply, pairs = run.overlap(
            partial(run.transport.fo_step, request),
            partial(run.client.pair_differences, batch, seeds, run.eps, lazy=not beside_server),
        )
        del request  # sent: h is freed before any perturbed forward runs in process
        losses.append(reply.loss)
        with run.client.phase("zo_estimate"):  # the client's bytes: its meter sees them
            # ∂L/∂h carries the server's 1/A accumulation scale; ZoRecords applies 1/(Q·A) itself
            grad = reply.grad * len(micro_batches)  # (S, L, H)
            del reply  # its unscaled ∂L/∂h
            for q, seed in enumerate(seeds):  # by index: each difference freed before the next
                records.add(seed, directional_derivative(grad, pairs[q], run.eps))
            del grad, pairs
    run.client.apply_zo(records.records, run.zo_lr(step), run.weight_decay)
    return sum(losses) / len(losses)


def frozen_step(run: SplitRunner, micro_batches: Sequence[Batch], step: int) -> float:
    """The server trains on the clean h exactly as in `hosl`; the client never changes."""
    losses: list[float] = []
    last = len(micro_batches) - 1
    for m, batch in enumerate(micro_batches):
        clean = run.client.activations(batch)  # (S, L, H), under inference mode
        reply = run.transport.hosl_step(
            HoslStepRequest(
                step=step, micro=m, update=m == last, batch=cut(batch, clean), perturbed=[],
                clean=clean.hidden,
            )
        )
        losses.append(reply.loss)
    return sum(losses) / len(losses)


def fo_step(run: SplitRunner, micro_batches: Sequence[Batch], step: int) -> float:
    run.client.start_step(step)
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
    records = ZoRecords(run.q, len(micro_batches))
    losses: list[float] = []
    last = len(micro_batches) - 1
    lr = run.zo_lr(step)
    for m, batch in enumerate(micro_batches):
        seeds = run.seeds(step, m)
        deltas = run.client.perturbed_deltas(batch, seeds, run.eps)
        reply = run.transport.zo_step(
            ZoStepRequest(
                step=step,
                micro=m,
                update=m == last,
                lr=lr,
                weight_decay=run.weight_decay,
                eps=run.eps,
                seeds=seeds,
                batch=cut(batch),  # ZO-ZO needs no clean forward pass
                perturbed=deltas,
            )
        )
        if isinstance(deltas, LazyDeltas):
            deltas.look_up_unread_rows()
        for seed, g in zip(seeds, reply.grads):
            records.add(seed, g)
        losses.append(sum(reply.losses) / len(reply.losses))
    run.client.apply_zo(records.records, lr, run.weight_decay)
    return sum(losses) / len(losses)


SPLIT_STEPS = {
    ("hosl", "losses"): hosl_step,
    ("hosl", "cut-grad"): hosl_cut_grad_step,
    ("fo", "losses"): fo_step,
    ("zo", "losses"): zo_step,
    ("frozen", "losses"): frozen_step,
}
