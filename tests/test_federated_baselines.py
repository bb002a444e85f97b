"""The baselines through the many-client code: SplitFed (`fo`, FedAvg of the client models),
`zo` (client and server updates both as records) and `frozen` (no client update, no sync bytes).

Pinned against independent computations: a plain single-client run that is handed each client's
model and optimizer by the test and averages them itself, replays of the records onto fresh
parts, and byte counts from |θ_c| alone.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import sentiment_examples, tiny_llama
from hosl.batching import collate
from hosl.build import build_run, fo_optimizer
from hosl.config import (
    ClientConfig,
    ClientsConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ZoConfig,
    load_config,
)
from hosl.errors import ConfigError
from hosl.federated.records import replay
from hosl.federated.run import FederatedRun, federate
from hosl.models.split import split_model
from hosl.sweep import plan_sweep
from hosl.transport.sessions import Roster
from hosl.zo import ZoTarget

TRAIN = sentiment_examples(30, seed=7)


def _cfg(mode: str, n: int, schedule: str = "parallel", optimizer: str = "adamw",
         steps: int = 6) -> TrainConfig:
    return TrainConfig(
        mode=mode, steps=steps, batch_size=4, seed=5,
        model=ModelConfig(name="tiny", split_layer=2),
        data=DataConfig(task="sst2"),
        zo=ZoConfig(q=2, eps=1e-3, lr=0.05),
        optim=OptimConfig(optimizer=optimizer, lr=0.01, weight_decay=0.01),
        clients=ClientsConfig(n=n, partition="iid", schedule=schedule),
    )


def _model() -> torch.nn.Module:
    return tiny_llama(seed=4)


def _federated(cfg: TrainConfig) -> FederatedRun:
    return federate(cfg, build_run(cfg, _model()), [ex.label for ex in TRAIN])


def _batches(run, tokenizer, cfg: TrainConfig, step: int) -> list:
    idx = run.example_indices(len(TRAIN), step, cfg.batch_size, cfg.grad_accum, cfg.seed)
    return [collate([TRAIN[i] for i in micro], tokenizer, 16) for micro in idx]


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _theta_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())  # float32


# SplitFed (mode fo) ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_splitfed_with_one_client_is_the_plain_fo_run_bit_for_bit(tokenizer, schedule) -> None:
    cfg = _cfg("fo", n=1, schedule=schedule)
    fed, plain = _federated(cfg), build_run(cfg, _model())
    for step in range(4):
        a = fed.train_step(_batches(fed, tokenizer, cfg, step), step)
        b = plain.train_step(_batches(plain, tokenizer, cfg, step), step)
        assert a == b
    assert _equal(_params(fed.client.part), _params(plain.client.part))
    assert _equal(_params(fed.server.part), _params(plain.server.part))


def test_splitfed_averages_the_clients_local_models(tokenizer) -> None:
    """Two IID clients, parallel rounds: a plain fo run is handed, by the test, the round's
    starting θ_c and each client's own AdamW before each client step; the test averages the two
    local models itself. The federated θ_c equals that mean bit for bit ((a + b) / 2 is the exact
    rounding of the mean, and the sum of two floats is exact in order), after every round."""
    cfg = _cfg("fo", n=2)
    fed = _federated(cfg)
    twin = build_run(cfg, _model())
    twin.client.scheduler = None  # constant schedule: the optimizers below keep their rate
    optimizers = [fo_optimizer(cfg, twin.client.part.parameters())[0] for _ in range(2)]
    local: list[list[torch.Tensor]] = []
    start = _params(twin.client.part)
    for step in range(6):
        batches = _batches(fed, tokenizer, cfg, step)
        fed.train_step(batches, step)
        client = fed.schedule.client_at(step)
        with torch.no_grad():
            for p, s in zip(twin.client.part.parameters(), start):
                p.copy_(s)
        twin.client.optimizer = optimizers[client]
        twin.train_step(batches, step)
        local.append(_params(twin.client.part))
        if step % 2 == 1:  # the round ends: θ_c is the mean of its two local models
            mean = [(a + b) / 2 for a, b in zip(*local)]
            assert not _equal(mean, local[0]) and not _equal(mean, local[1])
            assert _equal(_params(fed.client.part), mean), step
            with torch.no_grad():
                for p, m in zip(twin.client.part.parameters(), mean):
                    p.copy_(m)
            start, local = mean, []
        else:  # mid-round the shared part holds the round's start, not the client's model
            assert _equal(_params(fed.client.part), start)
    assert _equal(_params(fed.server.part), _params(twin.server.part))
    # each client kept its own optimizer state: its Adam step count is its own steps
    for c in range(2):
        steps = [s["step"] for s in fed.fedavg.opt_states[c].values()]
        assert steps and all(int(s) == 3 for s in steps)


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_splitfed_bytes_are_two_theta_c_per_client_per_round(tokenizer, schedule) -> None:
    cfg = _cfg("fo", n=3, schedule=schedule)
    run = _federated(cfg)
    for step in range(6):
        run.train_step(_batches(run, tokenizer, cfg, step), step)
    report = run.report(6, [ex.label for ex in TRAIN], None)
    theta = _theta_bytes(run.client.part)
    rounds = 2
    assert report["sync"] == "fedavg" and report["rounds"] == rounds
    for c in report["per_client"]:
        assert c["down_bytes"] == c["up_bytes"] == theta * rounds
        assert c["down_bytes"] + c["up_bytes"] == 2 * theta * rounds
    assert report["sync_bytes_per_client_round"] == 2 * theta
    assert report["fedavg_bytes_per_client_round"] == 2 * theta
    assert report["log_records"] == 0 and report["server_log_records"] == 0


@pytest.mark.parametrize("mode", ["fo", "hosl"])
def test_with_a_lora_client_fedavg_bytes_count_the_adapters_alone(tokenizer, mode) -> None:
    """SplitFed of a LoRA client moves its adapters, not the frozen base: the FedAvg figure that
    the records are compared with is 2 x the adapters' bytes, in fo (where it is what moves) and
    in hosl (where it is the baseline)."""
    cfg = replace(_cfg(mode, n=2), client=ClientConfig(adapter="lora", lora_rank=2))
    run = _federated(cfg)
    for step in range(2):
        run.train_step(_batches(run, tokenizer, cfg, step), step)
    report = run.report(2, [ex.label for ex in TRAIN], None)
    adapters = [p for n, p in run.client.part.named_parameters() if "lora_" in n]
    assert adapters
    adapter_bytes = sum(p.numel() * 4 for p in adapters)  # float32
    assert adapter_bytes < _theta_bytes(run.client.part) // 4
    assert report["fedavg_bytes_per_client_round"] == 2 * adapter_bytes
    if mode == "fo":
        assert report["sync_bytes_per_client_round"] == 2 * adapter_bytes


def test_sequential_splitfed_with_stateless_sgd_is_one_model_passed_along(tokenizer) -> None:
    """Sequential split learning: each client starts from its predecessor's model, so with a
    stateless optimizer three clients equal one plain fo run fed the same batches."""
    cfg = _cfg("fo", n=3, schedule="sequential", optimizer="sgd")
    fed, plain = _federated(cfg), build_run(cfg, _model())
    for step in range(6):
        batches = _batches(fed, tokenizer, cfg, step)
        assert fed.train_step(batches, step) == plain.train_step(batches, step)
    assert _equal(_params(fed.client.part), _params(plain.client.part))


def test_a_checkpoint_inside_a_splitfed_round_resumes_exactly(tokenizer) -> None:
    cfg = _cfg("fo", n=3)
    straight, first = _federated(cfg), _federated(cfg)
    for step in range(6):
        straight.train_step(_batches(straight, tokenizer, cfg, step), step)
    for step in range(5):  # two of round 1's three clients
        first.train_step(_batches(first, tokenizer, cfg, step), step)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = _federated(cfg)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    second.train_step(_batches(second, tokenizer, cfg, 5), 5)
    assert _equal(_params(second.client.part), _params(straight.client.part))
    assert _equal(_params(second.server.part), _params(straight.server.part))
    assert second.sync.books == straight.sync.books


# ZO-ZO and frozen -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_zo_clients_and_the_zo_server_are_both_records(tokenizer, schedule) -> None:
    """Replaying the client log onto a fresh client part and the server log onto a fresh server
    part gives the trained θ_c and θ_s bit for bit."""
    cfg = _cfg("zo", n=3, schedule=schedule)
    run = _federated(cfg)
    for step in range(6):
        run.train_step(_batches(run, tokenizer, cfg, step), step)
    client, server = split_model(_model(), cfg.model.split_layer)
    assert len(run.sync.log) == len(run.server_log) == 6
    assert [r.step for r in run.server_log.since(0)] == list(range(6))
    replay(ZoTarget(client), run.sync.log.since(0))
    replay(ZoTarget(server), run.server_log.since(0))
    assert _equal(_params(client), _params(run.client.part))
    assert _equal(_params(server), _params(run.server.part))
    assert not _equal(_params(server), _params(split_model(_model(), 2)[1]))  # it trained
    report = run.report(6, [ex.label for ex in TRAIN], None)
    assert report["sync"] == "records" and report["server_log_bytes"] == run.server_log.nbytes()
    assert 0 < report["sync_bytes_per_client_round"] < report["fedavg_bytes_per_client_round"]
    # a networked server's clients.json reads like this entry: every key of it, plus its own
    networked = Roster(max_clients=3, min_clients=1, total_steps=6, committed=lambda: 0).report()
    assert set(report) <= set(networked) and set(networked) - set(report) == {"ids", "networked"}
    assert networked["sync"] == "records"


def test_frozen_clients_move_no_bytes_and_no_parameters(tokenizer) -> None:
    cfg = _cfg("frozen", n=3, schedule="sequential", optimizer="sgd")
    fed, plain = _federated(cfg), build_run(cfg, _model())
    base = _params(fed.client.part)
    for step in range(6):
        batches = _batches(fed, tokenizer, cfg, step)
        assert fed.train_step(batches, step) == plain.train_step(batches, step)
    assert _equal(_params(fed.client.part), base)
    assert _equal(_params(fed.server.part), _params(plain.server.part))
    report = fed.report(6, [ex.label for ex in TRAIN], None)
    assert report["sync_bytes_per_client_round"] == 0 and report["log_records"] == 0
    assert all(c["down_bytes"] == c["up_bytes"] == 0 and c["steps"] == 2
               for c in report["per_client"])


def test_baseline_client_configs() -> None:
    assert load_config(overrides={"mode": "fo", "clients.n": "2"}).clients.n == 2
    with pytest.raises(ConfigError, match="model.dtype float32"):
        load_config(overrides={"mode": "fo", "clients.n": "2", "model.dtype": "bf16"})
    with pytest.raises(ConfigError, match="needs a split mode"):
        load_config(overrides={"mode": "fo-full", "clients.n": "2"})


def test_the_many_client_study_plans_its_runs(tmp_path) -> None:
    """experiments/clients.yaml: every run a valid config, the full grid of the study."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "clients.yaml"
    plan = plan_sweep(path, output_root=tmp_path)
    cells = {(r.config.mode, r.config.clients.n, r.config.clients.partition, r.config.seed)
             for r in plan.runs}
    assert len(plan.runs) == len(cells) == 3 * 2 * 3 * 2
    assert {c[0] for c in cells} == {"hosl", "fo", "zo"}
    assert {c[2] for c in cells} == {"iid", "dirichlet:1.0", "dirichlet:0.1"}
    assert all(r.config.clients.schedule == "parallel" and r.config.data.task == "rt"
               for r in plan.runs)
