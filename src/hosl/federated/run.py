"""N clients sharing one client model, in process: the sequential and parallel schedules.

Each step belongs to one client (`ClientSchedule`): that client catches up with the update log,
takes one ordinary training step on a batch of its own data (the step functions of
`hosl.algos.split_modes`, unchanged), and uploads the step's `ClientUpdate`, which the server
appends to the log. The server is one: it trains θ_s on every client's activations in turn.

Since replaying the log gives every client the same θ_c bit for bit, an in-process run keeps ONE
copy of the client model however many clients there are: catching up is then only counted (the
bytes a real client would download), never applied. `copies=True` gives every client its own
model, which really replays its catch-up records before stepping: the networked situation,
used by the tests to prove that the one-copy run is exact.

The baselines go through the same schedules, partitions and byte counts: `frozen` clients never
change θ_c (no records, zero sync bytes); `zo` clients send records as `hosl` clients do, and the
ZO server's own updates are records too (`server_log`); `fo` clients are SplitFed, kept in sync by
FedAvg of their client models (`hosl.federated.fedavg`), which moves 2 × |θ_c| per client per round.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hosl.batching import Batch
from hosl.build import Run
from hosl.config import TrainConfig
from hosl.federated.fedavg import FedAvgClients
from hosl.federated.partition import label_skew, parse_partition, partition_indices
from hosl.federated.records import ClientUpdate, UpdateLog, replay
from hosl.federated.schedule import ClientSchedule
from hosl.federated.sync import RecordSync
from hosl.models.lora import trainable_bytes
from hosl.parties.client import ClientParty
from hosl.sampler import step_indices


@dataclass
class FederatedRun(Run):
    """A `Run` whose steps are taken by N clients in turn (see the module docstring)."""

    schedule: ClientSchedule = field(default_factory=lambda: ClientSchedule(1))
    parts: list[list[int]] = field(default_factory=list)  # training-set indices of each client
    sync: RecordSync = field(default_factory=lambda: RecordSync(1))
    copies: list[ClientParty] | None = None  # one model per client (tests), else None: shared
    parallel: bool = False  # the parallel schedule (see `train_step`)
    total_steps: int = 0  # the run's steps: a parallel run's last round ends with its last step
    fedavg: FedAvgClients | None = None  # mode fo: SplitFed (see hosl.federated.fedavg)
    # mode zo: the ZO server's updates, as records (one server: nobody replays them in process)
    server_log: UpdateLog = field(default_factory=UpdateLog)
    _eval_cursor: int = 0  # with copies: how much of the log `client` (the evaluation view) holds
    # parallel: the current round's (client, update), applied when the round ends
    _round: list[tuple[int, ClientUpdate | None]] = field(default_factory=list)

    def example_indices(
        self, num_examples: int, step: int, batch_size: int, grad_accum: int, seed: int
    ) -> list[list[int]]:
        """The training-set indices of `step`'s micro-batches: the scheduled client's own data,
        in its own shuffled epochs (seeded by seed + client, so client 0 of a one-client run
        sees exactly the plain run's batches)."""
        client = self.schedule.client_at(step)
        part = self.parts[client]
        local = step_indices(len(part), self.schedule.local_step(step), batch_size, grad_accum,
                             seed + client)
        return [[part[i] for i in micro] for micro in local]

    def client_party(self, client: int) -> ClientParty:
        assert self.client is not None
        return self.client if self.copies is None else self.copies[client]

    def train_step(self, micro_batches: Sequence[Batch], step: int) -> float:
        """One client's step. Sequential: it catches up, steps, and its record joins the log at
        once, so the next client steps on the θ_c this one left. Parallel: every client of a
        round steps on the θ_c the round began with (its own update is held back); when the
        round ends its records join the log in the schedule's order and everyone applies them
        in that order. The server steps after each client either way (see docs/many_clients.md
        for why)."""
        client = self.schedule.client_at(step)
        if self.fedavg is not None:
            return self._fedavg_step(client, micro_batches, step)
        party = self.client_party(client)
        records = self.sync.catch_up(client)
        if self.copies is not None:
            replay(party.zo, records)  # one shared copy already holds every record
        party.last_update = None
        party.defer_updates = self.parallel
        runner = dataclasses.replace(self.runner, client=party)  # type: ignore[type-var]
        loss = self.step_fn(runner, micro_batches, step)
        update = party.last_update
        if update is not None:
            update = dataclasses.replace(update, step=step, client=client)
        self._log_server_update(step)
        if not self.parallel:
            self.sync.commit(client, update)
            return loss
        self._round.append((client, update))
        if self._round_ends(step):
            appended = self.sync.commit_round(self._round)
            self._round = []
            if self.copies is None:  # the one shared θ_c applies the round now
                replay(self.client.zo, appended)  # type: ignore[union-attr]
        return loss

    def _round_ends(self, step: int) -> bool:
        per_round = self.schedule.per_round
        return step % per_round == per_round - 1 or step == self.total_steps - 1

    def _fedavg_step(self, client: int, micro_batches: Sequence[Batch], step: int) -> float:
        """A SplitFed client's step: it downloads θ_c, steps with its own optimizer state, and
        uploads its model (averaged with the round's others when the round ends, parallel)."""
        assert self.fedavg is not None
        self.fedavg.begin(client, self.parallel)
        loss = self.step_fn(self.runner, micro_batches, step)
        self.fedavg.end(client, self.parallel, self._round_ends(step))
        book = self.sync.books[client]
        book.steps += 1
        book.down_bytes += self.fedavg.theta_bytes
        book.up_bytes += self.fedavg.theta_bytes
        return loss

    def _log_server_update(self, step: int) -> None:
        """A ZO server's update of this step, if it made one, joins `server_log`."""
        server = self.server
        update = getattr(server, "last_update", None) if server is not None else None
        if update is not None:
            self.server_log.append([dataclasses.replace(update, step=step, client=-1)])
            server.last_update = None  # type: ignore[union-attr]

    def scores(self, batch: Batch) -> torch.Tensor:
        if self.copies is not None:  # `client` is then a replica of its own, kept for evaluation
            assert self.client is not None
            replay(self.client.zo, self.sync.log.since(self._eval_cursor))
            self._eval_cursor = len(self.sync.log)
        return super().scores(batch)

    def state_dict(self) -> dict[str, Any]:
        pending = UpdateLog()  # a parallel round cut by a checkpoint: its records so far
        pending.append(update for _, update in self._round if update is not None)
        return {
            **super().state_dict(),
            "clients": {**self.sync.state_dict(), "round": pending.state_dict(),
                        "round_clients": [client for client, _ in self._round],
                        "server_log": self.server_log.state_dict(),
                        **({"fedavg": self.fedavg.state_dict()} if self.fedavg else {})},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sync.load_state_dict(state["clients"])
        pending = UpdateLog()
        pending.load_state_dict(state["clients"]["round"])
        held = {record.client: record for record in pending.since(0)}
        self._round = [(c, held.get(c)) for c in state["clients"]["round_clients"]]
        if "server_log" in state["clients"]:
            self.server_log.load_state_dict(state["clients"]["server_log"])
        if self.fedavg is not None:
            self.fedavg.load_state_dict(state["clients"]["fedavg"])

    def report(self, steps: int, labels: Sequence[int], predictions: Path | None) -> dict:
        """The `clients` entry of summary.json: data, sync bytes beside FedAvg's, per-client
        accuracy (see `per_client_accuracy`)."""
        assert self.client is not None
        theta_bytes = trainable_bytes(self.client.part)
        books = self.sync.books
        participations = sum(b.steps for b in books)
        sync_bytes = sum(b.down_bytes + b.up_bytes for b in books)
        rounds = self.schedule.rounds(steps)
        return {
            "n": self.schedule.n,
            # how θ_c stays the same on every client: replayed records, or FedAvg (mode fo)
            "sync": "fedavg" if self.fedavg is not None else "records",
            "schedule": "parallel" if self.parallel else "sequential",
            "order": self.schedule.order,
            "fraction": self.schedule.fraction,
            "per_round": self.schedule.per_round,
            "rounds": rounds,
            "sizes": [len(p) for p in self.parts],
            "label_skew": label_skew(labels, self.parts),
            "log_records": len(self.sync.log),
            "log_bytes": self.sync.log.nbytes(),
            "server_log_records": len(self.server_log),
            "server_log_bytes": self.server_log.nbytes(),
            # each participation is one client in one round: what it moved to stay in sync
            "sync_bytes_per_client_round": sync_bytes / participations if participations else 0,
            "fedavg_bytes_per_client_round": 2 * theta_bytes,
            "per_client": [
                {"examples": len(part), "steps": b.steps, "down_bytes": b.down_bytes,
                 "up_bytes": b.up_bytes}
                for part, b in zip(self.parts, books)
            ],
            "eval_accuracy_per_client": (
                per_client_accuracy(predictions, labels, self.parts) if predictions else None
            ),
        }


def per_client_accuracy(
    predictions: Path, train_labels: Sequence[int], parts: Sequence[Sequence[int]]
) -> list[float | None]:
    """Each client's accuracy: the global evaluation set's per-label accuracy, weighted by the
    client's own training label mix (Σ_y p_client(y) · acc(y)). Every client holds the same
    model, so what differs between clients is the data they care about; with label skew this
    is what each would measure on held-out data of its own mix. None for a client whose labels
    never occur in the evaluation set."""
    right: dict[int, int] = {}
    seen: dict[int, int] = {}
    for line in predictions.read_text().splitlines():
        p = json.loads(line)
        seen[p["label"]] = seen.get(p["label"], 0) + 1
        right[p["label"]] = right.get(p["label"], 0) + int(p["prediction"] == p["label"])
    out: list[float | None] = []
    for part in parts:
        mine = [train_labels[i] for i in part if train_labels[i] in seen]
        out.append(
            sum(right[y] / seen[y] for y in mine) / len(mine) if mine else None
        )
    return out


def client_partition(cfg: TrainConfig, labels: Sequence[int]) -> list[list[int]]:
    """Each client's training-set indices under `cfg.clients`."""
    c = cfg.clients
    return partition_indices(labels, c.n, parse_partition(c.partition), cfg.seed)


def federate(
    cfg: TrainConfig,
    run: Run,
    labels: Sequence[int],
    copies: bool = False,
    parts: list[list[int]] | None = None,
) -> FederatedRun:
    """`run` taken over by `cfg.clients.n` clients sharing its client model (`parts`: their
    data, by default `client_partition`)."""
    c = cfg.clients
    assert run.client is not None, "clients need a split run"
    parts = client_partition(cfg, labels) if parts is None else parts
    fields = {f.name: getattr(run, f.name) for f in dataclasses.fields(Run)}
    return FederatedRun(
        **fields,
        schedule=ClientSchedule(c.n, c.order, c.fraction, cfg.seed),
        parts=parts,
        sync=RecordSync(c.n),
        parallel=c.schedule == "parallel",
        total_steps=cfg.steps,
        copies=[_replica(run.client) for _ in range(c.n)] if copies else None,
        fedavg=FedAvgClients(run.client, c.n) if cfg.mode == "fo" else None,
    )


def _replica(party: ClientParty) -> ClientParty:
    """Another client holding the same θ_c (a copy of the part; a new `ZoTarget`, which keys
    its tensors by object identity and so cannot be deep-copied)."""
    assert party.optimizer is None, "a replica is a ZO client's"
    return ClientParty(copy.deepcopy(party.part), lazy_pairs=party.lazy_pairs,
                       row_sparse=party.zo.rows_seen is not None)
