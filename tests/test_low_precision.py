"""bf16 that trains or is refused: never a silent no-op, never NaN.

A ZO party stores bf16 and computes in float32 (θ + εz formed in float32 on use); its update is
rounded stochastically. An FO party keeps float32 master weights. Each property is checked
against an independent float32 computation.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import sentiment_examples, tiny_llama
from hosl.algos.split_modes import cut
from hosl.batching import collate
from hosl.build import build_run
from hosl.config import load_config
from hosl.errors import ConfigError
from hosl.master_weights import MasterWeights
from hosl.protocol import HoslStepRequest
from hosl.zo import PerturbedForward, ZoTarget, apply_zo_update_, noise_for
from hosl.zo.engine import _stochastic_round
from test_modes import _cfg, _fixed_batch_loss


def _bf16(cfg, wire: str = "bfloat16"):
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"), wire_dtype=wire
    )


def test_stochastic_rounding_is_unbiased() -> None:
    # a value a quarter of the way between two bf16 neighbours
    low = torch.tensor(1.0, dtype=torch.bfloat16)
    step = 2.0**-7  # bf16 spacing in [1, 2)
    x = torch.full((200_000,), 1.0 + step / 4)
    dither = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    rounded = _stochastic_round(x.clone(), dither, torch.bfloat16).float()
    assert set(rounded.unique().tolist()) == {low.item(), 1.0 + step}
    assert rounded.mean().item() == pytest.approx(x[0].item(), abs=step / 100)
    assert x.to(torch.bfloat16).float().mean().item() == low.item()  # round-to-nearest loses it


@pytest.mark.parametrize("lr", [1e-6, 1e-4])
def test_a_bf16_zo_update_lands_in_expectation(lr) -> None:
    torch.manual_seed(0)
    weight = torch.nn.Linear(256, 256, bias=False)
    reference = weight.weight.detach().clone()  # float32
    low = copy.deepcopy(weight).to(torch.bfloat16)
    start = low.weight.detach().float()
    records = [(11, 0.7), (12, -0.4)]
    apply_zo_update_(ZoTarget(low), records, lr)
    # the intended step, written out in float32 from the bf16 starting point
    z = {s: noise_for(reference, s, "weight") for s, _ in records}
    intended = -lr * sum(c * z[s] for s, c in records)
    landed = low.weight.detach().float() - start
    fraction = (landed * intended).sum() / (intended * intended).sum()
    assert fraction.item() == pytest.approx(1.0, abs=0.05)
    changed = (landed != 0).float().mean().item()
    assert changed > 0.001  # round-to-nearest changes almost none at lr 1e-6


def _estimates(tokenizer, runs) -> dict[str, torch.Tensor]:
    """g of 8 seeds for each (name, cfg, model dtype), through the run's own transport."""
    batch = collate(sentiment_examples(8, seed=3), tokenizer, 16)
    grads = {}
    for name, cfg, dtype in runs:
        run = build_run(cfg, tiny_llama(seed=3).to(dtype))
        seeds = run.runner.seeds(0, 0)
        clean = run.client.activations(batch)
        reply = run.transport.hosl_step(HoslStepRequest(
            step=0, micro=0, update=False, batch=cut(batch, clean),
            perturbed=run.client.perturbed_deltas(batch, seeds, 1e-3, clean.hidden),
            clean=clean.hidden,
        ))
        plus, minus = reply.losses[::2], reply.losses[1::2]
        grads[name] = torch.tensor([(a - b) / 2e-3 for a, b in zip(plus, minus)])
    return grads


def test_a_bf16_wire_keeps_the_zo_signal(tokenizer) -> None:
    """Differences on the wire: bf16 rounds h± − h relative to its own ε-sized scale. (The clean
    base stays float32 too, see test_transport_wire: on this tiny model a bf16 base costs little,
    on the real one 2.4%, benchmarks/results/zo_signal.md.)"""
    cfg = _cfg("hosl", q=8)
    grads = _estimates(tokenizer, [
        ("fp32", cfg, torch.float32),
        ("bf16", dataclasses.replace(cfg, wire_dtype="bfloat16"), torch.float32),
    ])
    error = ((grads["bf16"] - grads["fp32"]).abs() / grads["fp32"].abs()).median()
    assert torch.sign(grads["fp32"]).eq(torch.sign(grads["bf16"])).all(), grads
    assert error < 0.01, grads


def test_bf16_zo_estimates_agree_with_float32(tokenizer) -> None:
    """g of a bf16 client and server over a bf16 wire, against float32 throughout."""
    grads = _estimates(tokenizer, [
        ("fp32", _cfg("hosl", q=8), torch.float32),
        ("bf16", _bf16(_cfg("hosl", q=8)), torch.bfloat16),
    ])
    assert torch.sign(grads["fp32"]).eq(torch.sign(grads["bf16"])).all(), grads
    corr = torch.corrcoef(torch.stack([grads["fp32"], grads["bf16"]]))[0, 1]
    assert corr > 0.95, grads


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo", "fo-full", "zo-full"])
def test_every_mode_trains_in_bf16(tokenizer, mode) -> None:
    cfg = _bf16(_cfg(mode, steps=20))
    run = build_run(cfg, tiny_llama(seed=3).to(torch.bfloat16))
    batch = collate(sentiment_examples(8, seed=10), tokenizer, 16)
    before = _fixed_batch_loss(run, batch)
    for step in range(cfg.steps):
        loss = run.train_step([batch], step)
        assert loss == loss  # not NaN
    after = _fixed_batch_loss(run, batch)
    assert after < 0.9 * before, (before, after)
    # parameters are still stored in bf16: no float32 copy of the model was made
    parts = [run.runner.part] if run.client is None else [run.client.part]
    assert all(p.dtype == torch.bfloat16 for part in parts for p in part.parameters())


def test_master_weights_keep_updates_that_bf16_rounds_away() -> None:
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(64, 64)
    start = fp32.weight.detach().clone()
    low, plain = copy.deepcopy(fp32).to(torch.bfloat16), copy.deepcopy(fp32).to(torch.bfloat16)
    optimizers = [
        (fp32, torch.optim.SGD(fp32.parameters(), lr=1e-5)),
        (low, MasterWeights(low.parameters(), lambda ps: torch.optim.SGD(ps, lr=1e-5))),
        (plain, torch.optim.SGD(plain.parameters(), lr=1e-5)),
    ]
    x = torch.randn(16, 64)
    for _ in range(20):
        for model, opt in optimizers:
            model(x.to(model.weight.dtype)).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    masters = optimizers[1][1]
    # the masters moved as float32 SGD did (up to the bf16 forward's own rounding) ...
    want = fp32.weight.detach() - start
    got = masters.master_weights[0] - start.to(torch.bfloat16).float()  # masters start rounded
    assert ((got - want).norm() / want.norm()).item() < 0.1
    # ... while plain SGD on bf16 weights lost almost every one of those updates
    lost = (plain.weight.float() == start.to(torch.bfloat16).float()).float().mean().item()
    assert lost > 0.9
    torch.testing.assert_close(low.weight.float(), masters.master_weights[0].to(torch.bfloat16)
                               .float(), rtol=0, atol=0)
    state = masters.state_dict()
    again = MasterWeights(copy.deepcopy(low).parameters(), lambda ps: torch.optim.SGD(ps, lr=1e-5))
    again.load_state_dict(state)
    assert torch.equal(again.master_weights[0], masters.master_weights[0])


def test_a_float32_forward_inside_a_perturbed_one_leaves_the_parameters_alone() -> None:
    """The server's float32 loss runs inside a ZO-ZO perturbation: nested, neither context may
    leave a perturbed or upcast tensor behind in place of a parameter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = ZoTarget(model)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        with PerturbedForward(target, 5, 1e-2), PerturbedForward(target, None):
            perturbed = model(x)
        with PerturbedForward(target, None):
            plain = model(x)
    assert perturbed.dtype == plain.dtype == torch.float32
    assert not torch.equal(perturbed, plain)
    for name, param in model.named_parameters():
        assert isinstance(param, torch.nn.Parameter) and torch.equal(param, before[name]), name
    assert len(list(model.parameters())) == 4


def test_float16_is_refused_with_one_line() -> None:
    with pytest.raises(ConfigError, match="float16 is not supported.*bfloat16"):
        load_config(None, {"model.dtype": "fp16"})
