"""The networked many-client protocol against the in-process one: `hosl serve --max-clients 3`
with three `hosl client --client-id I` processes, each given the data file that `hosl train
--clients 3` wrote for client I (RUN/clients/client-00I.jsonl), the same seed and settings and
the same schedule, ends where the in-process run ends, bit for bit: the update log byte for
byte, θ_c on every client, θ_s with its optimizer and schedule state, every step's loss and
every prediction.

Why it holds: both sides run the same step function on the same batches with the same seeds.
Client I draws its own file in shuffled epochs seeded by seed + I, at its own step count (in
process `ClientSchedule.local_step`, over the network the server's count of I's steps); the
perturbation seeds and the learning rate follow the global step, which the server hands out
with the turn; the server takes one FO step per client step, in the order of the log; and a
record replayed is the update the live step made. Evaluation changes nothing (the in-process
run also evaluates mid-run, the networked clients only at the end).

What differs by design and is not compared: the networked clients skip the zero-shot
evaluation; their `down_bytes` count the last catch-up (at `done`) and, under the parallel
schedule, their own records, which an in-process client keeps; the networked report leaves
`label_skew` and the per-client accuracy null, since the labels stay with each client.

The networked turn order is the server's decision at run time: round-robin over the clients
connected and not replaying a catch-up (docs/many_clients.md). It is the in-process schedule
once every client has joined before the first turn (`--min-clients 3`): a client that asks for
its turn after another client's step replays what it lacks and keeps its place in line
(test_a_client_that_asks_a_step_late_keeps_its_place). The log's (step, client) order is still
checked first, so a failure there reads as a different schedule.

Every process is spawned (`subprocess`), runs with one thread and is killed in a `finally`.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import assert_same_state
from hosl.federated.records import ClientUpdate, UpdateLog
from hosl.federated.schedule import ClientSchedule
from hosl.transport.sessions import ClientHello, Roster
from test_networked_clients import DEADLINE_S, _hosl, _run_all, _state, _wait

N, STEPS = 3, 6  # two rounds of three clients (a parallel run ends with a whole round)

# Settings of both sides. A linear schedule makes both learning rates depend on the global
# step and on the run's length.
SHARED = ("--mode", "hosl", "--split-layer", "1", "--seed", "3", "--steps", str(STEPS),
          "--schedule", "linear")
# The server's own settings (`hosl serve`) and the clients' own (every `hosl client`); the
# in-process run takes both.
SERVER_OWN = ("--fo-lr", "0.1", "--optimizer", "adamw")
CLIENT_OWN = ("--task", "sst2", "--batch-size", "4", "--max-length", "16", "--q", "2",
              "--zo-lr", "5e-3", "--embedding-noise", "batch", "--no-progress",
              "--set", "memory_steps=0")  # metering every tensor operation costs time


@contextmanager
def _serving(model: Path, srv: Path, schedule: str) -> Iterator[str]:
    """`hosl serve` for N clients on 127.0.0.1 (no token: loopback only); its address. It is
    stopped by SIGTERM, which checkpoints θ_s and the log."""
    proc = _hosl("serve", "--model", str(model), *SHARED, *SERVER_OWN,
                 "--client-schedule", schedule, "--max-clients", str(N), "--min-clients", str(N),
                 "--output", str(srv), "--port", "0", "--set", "memory_steps=0",
                 log=srv.parent / "serve.out")
    try:
        _wait(lambda: (srv / "server.json").is_file() or proc.poll() is not None, "the server")
        assert proc.poll() is None, (srv.parent / "serve.out").read_text()[-3000:]
        yield f"127.0.0.1:{json.loads((srv / 'server.json').read_text())['port']}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (srv.parent / "serve.out").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _log(state: dict) -> UpdateLog:
    log = UpdateLog()
    log.load_state_dict(state["clients"]["log"])
    return log


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_networked_clients_given_the_in_process_files_end_at_the_in_process_bits(
    tiny_model_dir: Path, sentiment_files: tuple[Path, Path], tmp_path: Path, schedule: str
) -> None:
    """Round-robin, `sequential` (each client steps on its predecessor's θ_c) and `parallel`
    (each round's clients step on the θ_c it began with, the server one FO step per client):
    the networked run is the in-process run, bit for bit, on both sides of the split."""
    train_file, eval_file = sentiment_files
    reference = tmp_path / "in-process"
    # in a process of its own, as the networked ones: one thread each, the same start
    proc = _hosl("train", "--model", str(tiny_model_dir), *SHARED, *SERVER_OWN, *CLIENT_OWN,
                 "--train-file", str(train_file), "--eval-file", str(eval_file),
                 "--clients", str(N), "--partition", "iid", "--client-schedule", schedule,
                 "--eval-every", "3", "--output", str(reference), log=tmp_path / "train.out")
    try:
        assert proc.wait(DEADLINE_S) == 0, (tmp_path / "train.out").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    files = [reference / "clients" / f"client-{cid:03d}.jsonl" for cid in range(N)]
    assert all(f.is_file() for f in files)

    srv = tmp_path / "server"
    runs = {cid: tmp_path / f"client-{cid}" for cid in range(N)}
    with _serving(tiny_model_dir, srv, schedule) as address:
        procs = {cid: _hosl("client", "--server", address, "--client-id", str(cid),
                            "--model", str(tiny_model_dir), *SHARED, *CLIENT_OWN,
                            "--train-file", str(files[cid]), "--eval-file", str(eval_file),
                            "--output", str(runs[cid]), log=tmp_path / f"client-{cid}.out")
                 for cid in range(N)}
        _run_all(procs, tmp_path)

    ref, served = _state(reference), _state(srv)
    want, got = _log(ref), _log(served)
    # the same schedule: who took which step (else the server handed out turns in another
    # order, see the module doc, and nothing below is expected to hold)
    assert [(r.step, r.client) for r in got.since(0)] == [
        (r.step, r.client) for r in want.since(0)
    ] == [(step, step % N) for step in range(STEPS)]
    # the same records, byte for byte: seeds, coefficients, learning rates, looked-up rows
    differ = [step for step, (a, b) in enumerate(zip(got.encoded_since(0),
                                                     want.encoded_since(0))) if a != b]
    assert not differ, f"the update records of steps {differ} differ"
    assert got.digest(len(got)) == want.digest(len(want))
    # θ_s, its AdamW moments and its schedule: the server took the same steps in the same order
    assert_same_state(ref["server"], served["server"])

    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert len(ref["client"]["part"]) > 5 and len(ref["server"]["part"]) > 5
    networked_losses: dict[int, float] = {}
    predictions = (reference / "predictions.jsonl").read_text()
    for cid, run in runs.items():
        assert_same_state(ref["client"], _state(run)["client"])  # θ_c, tensor by tensor
        networked_losses.update(_losses(run))
        # every client evaluates the same model on the same set: the same predictions
        assert (run / "predictions.jsonl").read_text() == predictions, f"client {cid}"
    assert networked_losses == losses  # each step's loss, where it was taken, exactly

    # the books agree wherever the two count the same thing (see the module doc for
    # down_bytes); the report's shape of the run is the same
    mine = json.loads((reference / "summary.json").read_text())["clients"]
    theirs = json.loads((srv / "clients.json").read_text())
    for key in ("n", "schedule", "order", "fraction", "per_round", "rounds", "sizes",
                "log_records", "log_bytes", "fedavg_bytes_per_client_round"):
        assert theirs[key] == mine[key], key
    for a, b in zip(mine["per_client"], theirs["per_client"], strict=True):
        assert (b["examples"], b["steps"], b["up_bytes"]) == (a["examples"], a["steps"],
                                                                a["up_bytes"])


def test_a_client_that_asks_a_step_late_keeps_its_place() -> None:
    """The condition of the equality above, on the server's `Roster` (no network): the turns
    follow the in-process schedule whatever the timing of the requests. A client whose request
    arrives after other clients' steps lacks their records: it gets them at once as a catch-up
    and keeps its place in line, so it takes the step the in-process schedule gives it. (A
    client more than CATCH_UP_RECORDS behind is passed over while it replays: a late joiner on
    a long log, tests/test_networked_clients.py.)"""
    applied = [0]  # the server's committed steps (its ledger), by hand
    roster = Roster(max_clients=N, min_clients=N, total_steps=STEPS,
                    committed=lambda: applied[0])
    members = [ClientHello(cid, 0, 5, 64) for cid in range(N)]
    for member in members:
        roster.admit(member)
    stop = threading.Event()
    records: list[bytes] = []

    def take_turn(cid: int) -> int:
        """`cid` asks (replaying what it lacks first), steps, commits; the step it took."""
        answer = roster.wait_turn(members[cid], stop)
        while answer["catch_up"]:
            answer = roster.wait_turn(members[cid], stop)
        step = answer["step"]
        applied[0] += 1
        records.append(ClientUpdate(step, cid, 0.1, 0.0, ((step, 0.5),)).encode())
        roster.commit(members[cid], records[-1])
        return step

    schedule = ClientSchedule(N)
    assert [take_turn(schedule.client_at(step)) for step in range(3)] == [0, 1, 2]
    # client 0 asks for its next turn only now, two steps late: it lacks records 1 and 2
    late = roster.wait_turn(members[0], stop)
    assert late["catch_up"] and late["step"] is None and late["records"] == records[1:3]
    # while it replays them, the turn waits for it: step 3 is client 0's in process too
    assert schedule.client_at(3) == 0 and roster._next_client() == 0
    assert take_turn(0) == 3
