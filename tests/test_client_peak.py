"""The HOSL client's step order, which holds one perturbed activation at a time, against the
order that made all 2Q of them before sending any.

Numerics: the old order is written out here from the parties' plain calls (a forward at a
perturbation, a whole-message encode and decode, the server's handler): the losses, the server's
and the client's parameters after two steps of accumulated micro-batches must be the same, bit
for bit. Memory: the client's metered peak beyond its inference peak is one (B, L, H) activation
for the `losses` estimator and two for `cut-grad`, whatever Q is (the old order held 2Q and Q + 2).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama
from hosl.algos.split_modes import cut
from hosl.build import build_run
from hosl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.protocol import FoStepRequest, HoslStepRequest
from hosl.transport.messages import from_bytes, to_bytes
from hosl.zo import ZoRecords, directional_derivative, perturbation_seed
from test_memory_split import BATCH, HIDDEN, _batch, _config
from test_zo_wiring import _batches

EPS = 1e-3
WIRE = torch.bfloat16


def _cfg(estimator: str, q: int = 2, accum: int = 2) -> TrainConfig:
    return TrainConfig(
        mode="hosl", steps=2, batch_size=6, seed=3, grad_accum=accum, wire_dtype="bfloat16",
        model=ModelConfig(name="tiny", split_layer=2), data=DataConfig(task="sst2"),
        zo=ZoConfig(q=q, eps=EPS, lr=0.05, estimator=estimator),
        optim=OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.1),
    )


def _over_the_wire(message):
    """A whole message encoded at the wire dtype and decoded in float32, as one frame."""
    return from_bytes(to_bytes(message, WIRE))


def _old_order_step(run, estimator: str, batches, step: int) -> list[float]:
    """One step in the order that held every perturbed activation: the clean h, then all 2Q
    (or Q pair differences) computed and kept, one whole message each way."""
    client, server, cfg = run.client, run.server, run.runner
    records = ZoRecords(cfg.q, len(batches))
    losses = []
    for m, batch in enumerate(batches):
        seeds = [perturbation_seed(cfg.run_seed, step, m, q) for q in range(cfg.q)]
        clean = client.activations(batch)  # (S, L, H)
        update = m == len(batches) - 1
        at = [(seed, sign * cfg.eps) for seed in seeds for sign in (+1, -1)]  # h⁺_q, h⁻_q, ...
        hidden = [client.activations(batch, seed, scale).hidden for seed, scale in at]
        if estimator == "losses":
            deltas = [h - clean.hidden for h in hidden]  # all 2Q held at once
            reply = _over_the_wire(server.hosl_step(_over_the_wire(
                HoslStepRequest(step, m, update, cut(batch, clean), deltas, clean.hidden))))
            records.add_losses(seeds, reply.losses, cfg.eps)
        else:
            reply = _over_the_wire(server.fo_step(_over_the_wire(
                FoStepRequest(step, m, update, cut(batch, clean), clean.hidden))))
            grad = reply.grad * len(batches)
            for q, seed in enumerate(seeds):
                difference = hidden[2 * q] - hidden[2 * q + 1]  # h⁺_q − h⁻_q
                records.add(seed, directional_derivative(grad, difference, cfg.eps))
        losses.append(reply.loss)
    client.apply_zo(records.records, cfg.zo_lr(step), cfg.weight_decay)
    return losses


@pytest.mark.parametrize("estimator", ["losses", "cut-grad"])
def test_the_streamed_order_trains_bit_for_bit_as_the_old_one(tokenizer, estimator) -> None:
    model = tiny_llama(seed=4)
    cfg = _cfg(estimator)
    new, old = build_run(cfg, model), build_run(cfg, copy.deepcopy(model))
    for step in range(2):
        batches = _batches(tokenizer, step, cfg.grad_accum)
        new_loss = new.train_step(batches, step)
        old_losses = _old_order_step(old, estimator, batches, step)
        assert new_loss == sum(old_losses) / len(old_losses)
    for party in ("client", "server"):
        got = dict(getattr(new, party).part.named_parameters())
        want = dict(getattr(old, party).part.named_parameters())
        assert got.keys() == want.keys()
        for name in got:
            assert torch.equal(got[name], want[name]), (party, name)
    # both trained: the equality above is not that of two untouched copies
    untouched = dict(tiny_llama(seed=4).named_parameters())
    assert not torch.equal(untouched["model.layers.0.mlp.up_proj.weight"],
                           dict(new.client.part.named_parameters())["blocks.layers.0.mlp.up_proj.weight"])


def _client_peak_over_inference(estimator: str, q: int) -> float:
    """(HOSL client's metered peak over a step − its inference peak), in (B, L, H) tensors."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("opt"), attn_implementation="sdpa")
    cfg = TrainConfig(
        mode="hosl", steps=1, batch_size=BATCH, seed=0, wire_dtype="bfloat16",
        model=ModelConfig(name="tiny", split_layer=2), data=DataConfig(task="sst2", max_length=64),
        zo=ZoConfig(q=q, eps=1e-3, lr=1e-4, estimator=estimator),
        optim=OptimConfig(optimizer="sgd", lr=1e-3),
    )
    run = build_run(cfg, model)
    batch = _batch(64, torch.Generator().manual_seed(0))
    meter = run.client.start_metering("client")
    run.train_step([batch], 0)
    step_peak = meter.peak_bytes
    meter = run.client.start_metering("client")
    run.client.activations(batch)
    return (step_peak - meter.peak_bytes) / (BATCH * 64 * HIDDEN * 4)


@pytest.mark.parametrize("estimator,held", [("losses", 1), ("cut-grad", 2)])
def test_the_client_holds_the_same_activations_beyond_inference_whatever_q(estimator, held):
    """`losses`: the clean h beside each perturbed forward; `cut-grad`: ∂L/∂h and h⁺_q beside
    h⁻_q's forward. Noise and rounding add a little, never another activation."""
    beyond = {q: _client_peak_over_inference(estimator, q) for q in (1, 3)}
    for q, extra in beyond.items():
        assert held - 0.1 < extra < held + 0.5, (q, extra)
    assert beyond[3] == pytest.approx(beyond[1], abs=0.05)
