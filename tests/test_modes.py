"""The five modes on a tiny model: FO-FO split gradients equal centralized ones, and every mode
lowers the training loss of a tiny seeded task."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import sentiment_examples, tiny_llama
from hosl.algos.split_modes import cut
from hosl.batching import collate
from hosl.build import build_run
from hosl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.models.split import unsplit_model
from hosl.scoring import candidate_scores, classification_loss
from hosl.transport.messages import FoStepRequest


def _cfg(mode: str, k: int = 1, **kw) -> TrainConfig:
    return TrainConfig(
        mode=mode,
        steps=kw.pop("steps", 30),
        batch_size=8,
        seed=0,
        model=ModelConfig(name="tiny", split_layer=k),
        data=DataConfig(task="sst2"),
        zo=ZoConfig(q=kw.pop("q", 4), eps=1e-3, lr=kw.pop("zo_lr", 5e-3)),
        optim=OptimConfig(optimizer="sgd", lr=kw.pop("lr", 0.5)),
        **kw,
    )


@pytest.mark.parametrize("k", [0, 1, 3])
def test_fo_split_gradients_equal_unsplit_gradients(tokenizer, k) -> None:
    model = tiny_llama()
    reference = copy.deepcopy(model)
    batch = collate(sentiment_examples(6), tokenizer, max_length=16, padding_side="left")

    full = unsplit_model(reference)
    loss = classification_loss(
        candidate_scores(full(batch.input_ids, batch.attention_mask), full.head, batch.spec),
        batch.spec.labels,
    )
    loss.backward()
    expected = dict(reference.named_parameters())

    run = build_run(_cfg("fo", k), model)
    acts = run.client.forward_with_graph(batch)
    reply = run.server.fo_step(
        FoStepRequest(
            step=0, micro=0, update=False, batch=cut(batch, acts), hidden=acts.hidden.detach()
        )
    )
    run.client.backward(acts, reply.grad)
    assert reply.loss == pytest.approx(loss.item(), abs=1e-6)

    got = {
        n: p.grad for n, p in model.named_parameters()
    }  # client and server share model's tensors
    head_grad = run.server.part.head.weight.grad  # the server's own copy of the tied head
    for name, grad in got.items():
        want = expected[name].grad
        if name == "model.embed_tokens.weight":
            # tied: the unsplit gradient is the sum of the embedding's and the head's uses
            grad = (grad if grad is not None else 0) + head_grad
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-5, msg=name)


def _fixed_batch_loss(run, batch) -> float:
    scores = run.scores(batch)
    return classification_loss(scores, batch.spec.labels).item()


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("hosl", {"zo_lr": 2e-3}),
        ("fo", {}),
        ("zo", {}),
        ("fo-full", {}),
        ("zo-full", {}),
        ("hosl", {"grad_accum": 2, "steps": 20, "zo_lr": 2e-3}),
    ],
)
def test_every_mode_lowers_the_training_loss(tokenizer, mode, kw) -> None:
    # Rates where every mode descends steadily: at server SGD 0.5 (and client 5e-3) the losses
    # spiked to 5-6 within a few steps and where `hosl` ended depended on the CPU's float
    # kernels (ratio 0.31 with AVX2, 1.65 with AVX-512). Here the ratios are 0.013 / 0.008 /
    # 0.48 / 0.008 / 0.48 / 0.032, the same with either kernel set.
    cfg = _cfg(mode, **{"lr": 0.1, **kw})
    run = build_run(cfg, tiny_llama(seed=3))
    micro = [
        collate(sentiment_examples(8, seed=10 + m), tokenizer, 16) for m in range(cfg.grad_accum)
    ]
    probe = collate(sentiment_examples(8, seed=10), tokenizer, 16)
    before = _fixed_batch_loss(run, probe)
    for step in range(cfg.steps):
        run.train_step(micro, step)
    after = _fixed_batch_loss(run, probe)
    assert after < 0.7 * before, (before, after)
    if run.transport is not None:
        stats = run.transport.stats
        # one round trip per micro-batch per step, whatever Q is (plus the two evaluations)
        assert stats.train.round_trips == cfg.steps * cfg.grad_accum
        assert stats.eval.round_trips == 2


def test_hosl_client_keeps_no_gradients_and_server_keeps_training(tokenizer) -> None:
    run = build_run(_cfg("hosl", steps=2), tiny_llama())
    batch = collate(sentiment_examples(8), tokenizer, 16)
    server_before = [p.detach().clone() for p in run.server.part.parameters()]
    client_before = [p.detach().clone() for p in run.client.part.parameters()]
    run.train_step([batch], 0)
    assert all(p.grad is None for p in run.client.part.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(server_before, run.server.part.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(client_before, run.client.part.parameters()))
