"""The leanest first-order client: its own SGD, activation checkpointing, and a fused
backward-and-update. Each must compute exactly what plain backpropagation and SGD compute, while
holding less."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hosl.build import build_run
from hosl.config import ClientConfig, OptimConfig, load_config
from hosl.errors import ConfigError
from hosl.models.blocks import use_checkpointing
from hosl.models.split import split_model
from test_zo_wiring import MODELS, _batches, _cfg


def _client_grads_and_saved_bytes(model, batch, checkpointing: bool):
    client, _ = split_model(model, 2)
    if checkpointing:
        assert use_checkpointing(client) == 1
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = client(batch.input_ids, batch.attention_mask).hidden  # (S, L, H)
    hidden.square().sum().backward()
    return {n: p.grad.clone() for n, p in client.named_parameters()}, sum(saved)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_checkpointing_gives_the_same_gradients_and_saves_less(tokenizer, family) -> None:
    batch = _batches(tokenizer, 0, 1)[0]
    plain, plain_bytes = _client_grads_and_saved_bytes(MODELS[family](), batch, False)
    lean, lean_bytes = _client_grads_and_saved_bytes(MODELS[family](), batch, True)
    for name in plain:
        torch.testing.assert_close(lean[name], plain[name], rtol=0, atol=1e-6, msg=name)
    # only each block's input is kept for the backward, not its inner activations
    assert lean_bytes < plain_bytes / 3, (lean_bytes, plain_bytes)


def _fo(client: ClientConfig, accum: int = 1):
    return dataclasses.replace(
        _cfg("fo", accum=accum), client=client,
        optim=OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.1, schedule="linear"),
    )


def test_the_fused_update_equals_sgd_and_never_holds_the_whole_gradient(tokenizer) -> None:
    """Three fo steps with a linear schedule and weight decay: the fused client (with
    checkpointing) ends where torch.optim.SGD on the whole gradient ends; during its backward at
    most a fraction of the client's gradients exist at once, and the embedding's are sparse."""
    plain = build_run(_fo(ClientConfig(optimizer="sgd", lr=0.05)), MODELS["llama"]())
    fused = build_run(
        _fo(ClientConfig(optimizer="sgd", lr=0.05, fused_update=True, checkpointing=True)),
        MODELS["llama"](),
    )
    assert fused.client.optimizer is None and plain.client.optimizer is not None
    params = [p for p in fused.client.part.parameters() if p.requires_grad]
    held: list[int] = []
    sparse: list[bool] = []

    def watch(param: torch.Tensor) -> None:  # runs after the fused step freed `param.grad`
        held.append(sum(p.grad.numel() for p in params if p.grad is not None))

    embedding = next(m for m in fused.client.part.modules() if isinstance(m, torch.nn.Embedding))
    embedding.weight.register_hook(lambda g: sparse.append(g.is_sparse))
    for p in params:
        p.register_post_accumulate_grad_hook(watch)
    for step in range(3):
        for run in (plain, fused):
            run.train_step(_batches(tokenizer, step, 1), step)
    for (name, a), (_, b) in zip(plain.client.part.named_parameters(),
                                 fused.client.part.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert len(held) == 3 * len(params) and max(held) == 0  # each freed as soon as it was used
    assert sparse == [True] * 3
    assert all(p.grad is None for p in params)
    start = MODELS["llama"]().state_dict()
    names = fused.client.part.model_names
    assert any(not torch.equal(start[names[n]], p)
               for n, p in fused.client.part.named_parameters())  # it trained


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"client.fused_update": True}, "needs client.optimizer sgd"),
        ({"client.fused_update": True, "client.optimizer": "sgd", "grad_accum": 2},
         "cannot accumulate"),
        ({"mode": "hosl", "client.checkpointing": True}, "mode hosl has none"),
        ({"client.optimizer": "lion"}, "client.optimizer must be one of"),
    ],
)
def test_lean_client_settings_that_cannot_work_are_refused(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"mode": "fo", **overrides})
