"""Many clients, one θ_c: update records, the log, catch-up by replay, the sequential schedule.

Pinned against independent computations: a second copy of the client model rebuilt from the
decoded records alone, one real model per client syncing only through the log, a plain
single-client run fed the same batches, and byte counts from the record layout written out here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np
import pytest
import torch

import hosl.federated.schedule as schedule_module
from conftest import sentiment_examples, tiny_llama
from hosl.batching import collate
from hosl.build import build_run
from hosl.config import (
    ClientsConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ZoConfig,
    load_config,
)
from hosl.errors import ConfigError
from hosl.federated.records import ClientUpdate, UpdateLog, replay
from hosl.federated.run import FederatedRun, federate
from hosl.federated.schedule import ClientSchedule
from hosl.models.split import split_model
from hosl.zo import ZoTarget
from hosl.zo.seeds import tensor_seed

TRAIN = sentiment_examples(30, seed=7)
EMBED = "model.embed_tokens.weight"


def _cfg(
    mode: str = "hosl", n: int = 3, noise: str = "all", estimator: str = "losses",
    partition: str = "iid", order: str = "round-robin", fraction: float = 1.0, accum: int = 1,
) -> TrainConfig:
    return TrainConfig(
        mode=mode, steps=6, batch_size=4, seed=5, grad_accum=accum,
        model=ModelConfig(name="tiny", split_layer=2),
        data=DataConfig(task="sst2"),
        zo=ZoConfig(q=2, eps=1e-3, lr=0.05, estimator=estimator, embedding_noise=noise),
        optim=OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.01),
        clients=ClientsConfig(n=n, partition=partition, order=order, fraction=fraction),
    )


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return tiny_llama(seed=4).to(dtype)


def _batches(run, tokenizer, cfg: TrainConfig, step: int) -> list:
    idx = run.example_indices(len(TRAIN), step, cfg.batch_size, cfg.grad_accum, cfg.seed)
    return [collate([TRAIN[i] for i in micro], tokenizer, 16) for micro in idx]


def _federated(cfg: TrainConfig, copies: bool = False, dtype=torch.float32) -> FederatedRun:
    return federate(cfg, build_run(cfg, _model(dtype)), [ex.label for ex in TRAIN], copies)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _assert_bitwise(got: torch.nn.Module, want: torch.nn.Module) -> None:
    a, b = _params(got), _params(want)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _record_size(record: ClientUpdate) -> int:
    """The layout of docs/many_clients.md, written out: header 36 bytes (step int64, client
    int32, lr and weight decay float64, two uint32 counts), 16 per (seed, c), and per row group
    10 bytes + the name + 4 per row id."""
    groups = [(name, ids) for per in (record.rows or {}).values() for name, ids in per.items()]
    return 36 + 16 * len(record.coefs) + sum(10 + len(n.encode()) + 4 * len(i) for n, i in groups)


# Stage 2: records and replay ------------------------------------------------------------------


@pytest.mark.parametrize(
    "noise,estimator,dtype",
    [("all", "losses", torch.float32), ("batch", "losses", torch.float32),
     ("batch", "cut-grad", torch.float32), ("batch", "losses", torch.bfloat16)],
)
def test_decoded_records_rebuild_the_client_bit_for_bit(tokenizer, noise, estimator, dtype):
    cfg = _cfg(noise=noise, estimator=estimator, accum=2)
    run = _federated(cfg, dtype=dtype)
    for step in range(4):
        run.train_step(_batches(run, tokenizer, cfg, step), step)
    base = split_model(_model(dtype), cfg.model.split_layer)[0]
    records = [ClientUpdate.decode(b) for b in run.sync.log.encoded_since(0)]
    assert [r.step for r in records] == [0, 1, 2, 3]
    assert [r.client for r in records] == [run.schedule.client_at(s) for s in range(4)]
    before = _params(base)
    replay(ZoTarget(base), records)
    assert any(not torch.equal(before[n], p) for n, p in _params(base).items())  # it moved
    _assert_bitwise(base, run.client.part)
    if noise == "batch":  # the rows are part of the update: without them the replay differs
        bare = split_model(_model(dtype), cfg.model.split_layer)[0]
        replay(ZoTarget(bare), [ClientUpdate(r.step, r.client, r.lr, r.weight_decay, r.coefs)
                                for r in records])
        assert any(not torch.equal(p, q) for p, q in zip(_params(bare).values(),
                                                        _params(run.client.part).values()))


def test_a_record_round_trips_and_its_size_is_its_layout() -> None:
    rows = {11: {EMBED: torch.tensor([1, 5, 9])}, 12: {EMBED: torch.tensor([2])}}
    record = ClientUpdate(7, 2, 0.05, 0.01, ((11, 0.25), (12, -1.5e-7), (2**64 - 1, 3.0)), rows)
    data = record.encode()
    assert len(data) == _record_size(record) == 36 + 48 + 2 * (10 + len(EMBED)) + 16
    back = ClientUpdate.decode(data)
    assert (back.step, back.client, back.lr, back.weight_decay, back.coefs) == (
        7, 2, 0.05, 0.01, record.coefs)
    assert back.rows is not None and back.rows.keys() == rows.keys()
    for seed in rows:
        assert torch.equal(back.rows[seed][EMBED], rows[seed][EMBED])
    with pytest.raises(ValueError, match="holds"):
        ClientUpdate.decode(data + b"\0")


def test_the_log_survives_a_checkpoint(tokenizer) -> None:
    cfg = _cfg(noise="batch")
    run = _federated(cfg)
    for step in range(3):
        run.train_step(_batches(run, tokenizer, cfg, step), step)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = _federated(cfg)
    other.load_state_dict(state)
    assert other.sync.log.encoded_since(0) == run.sync.log.encoded_since(0)
    assert other.sync.books == run.sync.books
    log = UpdateLog()
    log.load_state_dict(UpdateLog().state_dict())
    assert len(log) == 0


# Stage 3: the sequential schedule ---------------------------------------------------------------


def _plain_twin(cfg: TrainConfig, fed: FederatedRun, tokenizer, steps: int):
    """A single-client run fed, step by step, the batches the federated run trained on."""
    plain = build_run(cfg, _model())
    losses = []
    for step in range(steps):
        losses.append(plain.train_step(_batches(fed, tokenizer, cfg, step), step))
    return plain, losses


@pytest.mark.parametrize(
    "partition,order,fraction,noise",
    [("iid", "round-robin", 1.0, "batch"), ("dirichlet:0.3", "sampled", 0.67, "all")],
)
def test_one_model_per_client_syncing_by_records_equals_one_model(
    tokenizer, partition, order, fraction, noise
) -> None:
    """N real client models that share nothing but the log: after every round, once caught up,
    all hold θ_c bitwise equal to the one-copy run's and to a single-client run fed the same
    batches; the losses are those of the single-client run, bit for bit."""
    cfg = _cfg(n=3, noise=noise, partition=partition, order=order, fraction=fraction)
    steps = 6
    copies = _federated(cfg, copies=True)
    shared = _federated(cfg)
    plain, plain_losses = _plain_twin(cfg, shared, tokenizer, steps)
    assert copies.copies is not None and len(copies.copies) == 3
    losses = {"copies": [], "shared": []}
    m = copies.schedule.per_round
    for step in range(steps):
        for name, run in (("copies", copies), ("shared", shared)):
            losses[name].append(run.train_step(_batches(run, tokenizer, cfg, step), step))
        if step % m == m - 1:  # a round ended: every client catches up, then all agree
            for c, party in enumerate(copies.copies):
                replay(party.zo, copies.sync.catch_up(c))
                _assert_bitwise(party.part, shared.client.part)
    assert losses["copies"] == losses["shared"] == plain_losses
    _assert_bitwise(shared.client.part, plain.client.part)
    _assert_bitwise(copies.server.part, plain.server.part)
    # the clients really took turns on their own data
    assert {copies.schedule.client_at(s) for s in range(steps)} == {0, 1, 2} or fraction < 1
    for s in range(steps):
        c = copies.schedule.client_at(s)
        idx = copies.example_indices(len(TRAIN), s, cfg.batch_size, 1, cfg.seed)
        assert set(idx[0]) <= set(copies.parts[c])


def test_one_client_is_the_plain_run_bit_for_bit(tokenizer) -> None:
    cfg = _cfg(n=1, noise="batch")
    fed = _federated(cfg)
    plain = build_run(cfg, _model())
    for step in range(4):
        a = fed.train_step(_batches(fed, tokenizer, cfg, step), step)
        b = plain.train_step(_batches(plain, tokenizer, cfg, step), step)
        assert a == b
    _assert_bitwise(fed.client.part, plain.client.part)
    _assert_bitwise(fed.server.part, plain.server.part)


def test_a_late_joiner_catches_up_from_the_base_model(tokenizer) -> None:
    cfg = _cfg(n=3, noise="batch")
    run = _federated(cfg)
    for step in range(5):
        run.train_step(_batches(run, tokenizer, cfg, step), step)
    joiner = run.sync.join()
    records = run.sync.catch_up(joiner)
    assert len(records) == 5
    base = split_model(_model(), cfg.model.split_layer)[0]
    replay(ZoTarget(base), records)
    _assert_bitwise(base, run.client.part)
    assert run.sync.books[joiner].down_bytes == sum(_record_size(r) for r in records)


def test_sync_bytes_are_the_records_sizes(tokenizer) -> None:
    """Each client uploads its own records and downloads every other record made before its
    last step; counted here from the records' fields and the layout alone."""
    cfg = _cfg(n=3, noise="batch", order="sampled", fraction=0.67)
    run = _federated(cfg)
    steps = 8
    for step in range(steps):
        run.train_step(_batches(run, tokenizer, cfg, step), step)
    records = run.sync.log.since(0)
    assert len(records) == steps
    for c, book in enumerate(run.sync.books):
        mine = [s for s in range(steps) if run.schedule.client_at(s) == c]
        assert book.steps == len(mine)
        assert book.up_bytes == sum(_record_size(r) for r in records if r.client == c)
        last = mine[-1] if mine else -1
        assert book.down_bytes == sum(
            _record_size(r) for r in records if r.client != c and r.step < last
        )
    report = run.report(steps, [ex.label for ex in TRAIN], None)
    total = sum(b.down_bytes + b.up_bytes for b in run.sync.books)
    assert report["sync_bytes_per_client_round"] == total / steps
    theta = sum(p.numel() * 4 for p in run.client.part.parameters())
    assert report["fedavg_bytes_per_client_round"] == 2 * theta


def test_schedules_are_seeded_and_fair() -> None:
    cfg = _cfg(n=4)
    run = _federated(cfg)
    assert [run.schedule.client_at(s) for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [run.schedule.local_step(s) for s in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    sampled = _federated(_cfg(n=5, order="sampled", fraction=0.4)).schedule
    assert sampled.per_round == 2
    rounds = [sampled.round_clients(r) for r in range(50)]
    assert all(len(set(r)) == 2 for r in rounds)
    assert {c for r in rounds for c in r} == set(range(5))
    assert rounds != [rounds[0]] * 50
    for s in range(20):
        c = sampled.client_at(s)
        assert sampled.local_step(s) == sum(sampled.client_at(t) == c for t in range(s))


def _clients_by_step(n: int, order: str, fraction: float, seed: int, steps: int) -> list[int]:
    """The schedule written out from its definition (module doc of hosl.federated.schedule)."""
    m = max(1, min(n, round(fraction * n)))
    out: list[int] = []
    for r in range(-(-steps // m)):
        if order == "round-robin":
            out += [(r * m + j) % n for j in range(m)]
        else:
            rng = np.random.default_rng(tensor_seed(seed, f"clients-round-{r}"))
            out += [int(c) for c in rng.choice(n, size=m, replace=False)]
    return out[:steps]


def test_local_step_counts_earlier_turns_drawing_each_round_once(monkeypatch) -> None:
    steps = 60
    for n in (1, 2, 3, 5, 8):
        for order in ("round-robin", "sampled"):
            for fraction in (0.2, 0.5, 0.75, 1.0):
                for seed in (0, 3):
                    schedule = ClientSchedule(n, order, fraction, seed)
                    clients = _clients_by_step(n, order, fraction, seed, steps)
                    for s, c in enumerate(clients):
                        assert schedule.client_at(s) == c
                        assert schedule.local_step(s) == clients[:s].count(c), (
                            n, order, fraction, seed, s)
    # a run's steps in order draw each round about once (the count was O(steps²) draws)
    draws = [0]
    original = schedule_module._round_clients

    def counted(*args: object) -> tuple[int, ...]:
        draws[0] += 1
        return original(*args)

    monkeypatch.setattr(schedule_module, "_round_clients", counted)
    sampled = ClientSchedule(3, "sampled", 0.34, seed=4242)  # one client a round
    assert [sampled.local_step(s) for s in range(600)] == [
        c[:s].count(c[s]) for c in [_clients_by_step(3, "sampled", 0.34, 4242, 600)]
        for s in range(600)]
    assert draws[0] <= 2 * 600
    # the rounds the cache hands out cannot be changed by whoever receives them
    first = sampled.round_clients(0)
    with contextlib.suppress(TypeError):  # a tuple refuses; a shared list would change
        first[0] = 1 - first[0]  # type: ignore[index]
    assert sampled.round_clients(0)[0] == _clients_by_step(3, "sampled", 0.34, 4242, 1)[0]


def test_client_configs_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs a split mode"):
        load_config(overrides={"mode": "zo-full", "clients.n": "2"})
    with pytest.raises(ConfigError, match="clients.schedule"):
        load_config(overrides={"clients.n": "2", "clients.schedule": "async"})
    with pytest.raises(ConfigError, match="clients.order"):
        load_config(overrides={"clients.order": "random"})
    assert load_config(overrides={"clients.n": "2"}).clients.n == 2


# Stage 4: the parallel schedule -----------------------------------------------------------------


class _CleanRecorder:
    """A transport that keeps the clean activations each hosl step sent."""

    def __init__(self, inner) -> None:
        self.inner, self.clean = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def hosl_step(self, req):
        self.clean.append(req.clean.clone())
        return self.inner.hosl_step(req)


def _parallel_cfg(**kw) -> TrainConfig:
    cfg = _cfg(n=3, noise="batch", **kw)
    return dataclasses.replace(cfg, clients=dataclasses.replace(cfg.clients, schedule="parallel"))


def test_a_parallel_round_steps_every_client_on_the_rounds_theta_c(tokenizer) -> None:
    """Within a round every client's clean h is the forward of the θ_c the round began with
    (a reference copy advanced by whole rounds only); after the round θ_c is that θ_c plus the
    round's records in schedule order; one model per client agrees, bitwise, after every round."""
    cfg = _parallel_cfg()
    shared, copies = _federated(cfg), _federated(cfg, copies=True)
    recorder = _CleanRecorder(shared.runner.transport)
    shared.runner.transport = recorder
    reference = split_model(_model(), cfg.model.split_layer)[0]
    m = shared.schedule.per_round
    losses = {"shared": [], "copies": []}
    for step in range(6):
        batches = _batches(shared, tokenizer, cfg, step)
        for name, run in (("shared", shared), ("copies", copies)):
            losses[name].append(run.train_step(batches, step))
        with torch.inference_mode():
            want = reference(batches[0].input_ids, batches[0].attention_mask).hidden
        assert torch.equal(recorder.clean[-1], want), step
        if step % m == m - 1:
            round_records = shared.sync.log.since(len(shared.sync.log) - m)
            want = shared.schedule.round_clients(step // m)
            assert [r.client for r in round_records] == list(want)
            replay(ZoTarget(reference), round_records)
            _assert_bitwise(reference, shared.client.part)
            for c, party in enumerate(copies.copies):
                replay(party.zo, copies.sync.catch_up(c))
                _assert_bitwise(party.part, shared.client.part)
    assert losses["shared"] == losses["copies"]
    # not the sequential run: there the second client steps on the first one's θ_c
    sequential = _federated(_cfg(n=3, noise="batch"))
    for step in range(3):
        sequential.train_step(_batches(sequential, tokenizer, cfg, step), step)
    assert any(not torch.equal(p, q) for p, q in zip(sequential.client.part.parameters(),
                                                    shared.client.part.parameters()))


def test_a_parallel_client_downloads_only_the_others_records(tokenizer) -> None:
    cfg = _parallel_cfg()
    run = _federated(cfg)
    for step in range(6):
        run.train_step(_batches(run, tokenizer, cfg, step), step)
    records = run.sync.log.since(0)
    for c, book in enumerate(run.sync.books):
        # round 0's records, fetched before each client's round-1 step, minus its own
        assert book.down_bytes == sum(_record_size(r) for r in records[:3] if r.client != c)
        assert book.up_bytes == sum(_record_size(r) for r in records if r.client == c)


def test_a_checkpoint_inside_a_parallel_round_resumes_exactly(tokenizer) -> None:
    cfg = _parallel_cfg()
    straight, first = _federated(cfg), _federated(cfg)
    for step in range(6):
        straight.train_step(_batches(straight, tokenizer, cfg, step), step)
    for step in range(4):  # one step into round 1
        first.train_step(_batches(first, tokenizer, cfg, step), step)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = _federated(cfg)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(4, 6):
        second.train_step(_batches(second, tokenizer, cfg, step), step)
    _assert_bitwise(second.client.part, straight.client.part)
    _assert_bitwise(second.server.part, straight.server.part)
    assert second.sync.log.encoded_since(0) == straight.sync.log.encoded_since(0)


def test_parallel_steps_fill_whole_rounds() -> None:
    with pytest.raises(ConfigError, match="multiple of the 3 client steps"):
        load_config(overrides={"clients.n": "3", "clients.schedule": "parallel", "steps": "7"})
