"""Many `hosl client --client-id I` processes with one `hosl serve --max-clients N` on 127.0.0.1:
each client reads only its own data file, and all of them end holding one bit-identical client
model, rebuilt from nothing but the server's update log. Ids are bound to tokens; a killed or
hung client is dropped and the others train on; a late joiner and a restarted client catch up.

Every process runs under a deadline and is killed in a `finally`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch

from conftest import sentiment_rows, tiny_llama
from hosl.build import build_run
from hosl.checkpoint import load_latest
from hosl.cli import main
from hosl.config import TrainConfig
from hosl.errors import HoslError
from hosl.federated.records import ClientUpdate, UpdateLog, replay
from hosl.models.split import split_model
from hosl.remote import RemoteOptions, make_transport, run_fingerprint
from hosl.transport.codec import encode
from hosl.transport.framing import grpc_options
from hosl.transport.grpc_server import ServerState, _Refuse
from hosl.transport.handshake import identity_for
from hosl.transport.inbox import InboxClosed
from hosl.transport.ledger import StepLedger
from hosl.transport.sessions import (
    IDS_PER_SLOT,
    MAX_CLIENT_ID,
    ClientHello,
    MultiClientServicer,
    Roster,
)
from hosl.zo import ZoTarget
from test_grpc_transport import _cfg as _grpc_cfg

SRC = Path(__file__).resolve().parents[1] / "src"
DEADLINE_S = 240  # a safety net for a loaded machine; a normal run needs seconds
TOKENS = {0: "token-of-zero", 1: "token-of-one", 2: "token-of-two", 3: "token-of-three"}
SIZES = {0: 20, 1: 24, 2: 28, 3: 16}  # each client's own training file, of its own size


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HOSL_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _hosl(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "hosl.cli", *args], env=_env(),
                                stdout=out, stderr=out)


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _server_log(srv: Path) -> str:
    log = srv / "server.log"
    return log.read_text() if log.is_file() else ""


def _committed(srv: Path) -> int:
    lines = _server_log(srv).splitlines()
    return max((int(x.rsplit(" ", 1)[1]) for x in lines if " committed step " in x), default=0)


@pytest.fixture
def files(tmp_path: Path) -> dict:
    """Per-client training files (different rows, different sizes), one eval file, tokens."""
    root = tmp_path / "data"
    root.mkdir()
    out: dict = {"eval": root / "eval.jsonl", "tokens": root / "tokens"}
    out["eval"].write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(8, 2)))
    out["tokens"].write_text("".join(f"{cid} {tok}\n" for cid, tok in TOKENS.items()))
    for cid, n in SIZES.items():
        (root / f"train-{cid}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in sentiment_rows(n, 100 + cid)))
        (root / f"token-{cid}").write_text(TOKENS[cid] + "\n")
    return out


@contextmanager
def server(model: Path, srv: Path, files: dict, steps: int, *extra: str
           ) -> Iterator[tuple[subprocess.Popen, str]]:
    args = ["--model", str(model), "--split-layer", "1", "--mode", "hosl", "--server-lr", "0.1",
            "--optimizer", "adamw", "--steps", str(steps), "--output", str(srv), "--port", "0",
            "--client-tokens", str(files["tokens"]), "--set", "memory_steps=0", *extra]
    proc = _hosl("serve", *args, log=srv.parent / "serve.out")
    try:
        _wait(lambda: (srv / "server.json").is_file() or proc.poll() is not None, "the server")
        assert proc.poll() is None, (srv.parent / "serve.out").read_text()[-3000:]
        yield proc, f"127.0.0.1:{json.loads((srv / 'server.json').read_text())['port']}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _client_args(model: Path, files: dict, address: str, cid: int, out: Path, steps: int,
                 token_of: int | None = None) -> list[str]:
    token = files["tokens"].parent / f"token-{cid if token_of is None else token_of}"
    return [
        "client", "--server", address, "--client-id", str(cid), "--token-file", str(token),
        "--model", str(model), "--task", "sst2",
        "--train-file", str(files["tokens"].parent / f"train-{cid}.jsonl"),
        "--eval-file", str(files["eval"]), "--split-layer", "1", "--batch-size", "4",
        "--max-length", "16", "--q", "2", "--client-lr", "5e-3", "--embedding-noise", "batch",
        "--steps", str(steps), "--output", str(out), "--no-progress",
        "--set", "memory_steps=0",  # metering every tensor operation costs a tiny run its time
    ]


def _state(run: Path) -> dict:
    loaded = load_latest(run)
    assert loaded is not None, f"{run} has no checkpoint"
    return loaded[1]


def _theta_c(run: Path) -> dict[str, torch.Tensor]:
    return _state(run)["client"]["part"]


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _server_records(srv: Path) -> list[ClientUpdate]:
    log = UpdateLog()
    log.load_state_dict(_state(srv)["clients"]["log"])
    return log.since(0)


def _rebuilt_from_log(records: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """The base client part (the same random model the clients loaded) with the server's log
    replayed onto it: what every client must hold, computed without any client."""
    part = split_model(tiny_llama(), 1)[0]
    replay(ZoTarget(part), records)
    return part.state_dict()


def _run_all(procs: dict[int, subprocess.Popen], logs: Path) -> None:
    try:
        for cid, proc in procs.items():
            rc = proc.wait(DEADLINE_S)
            assert rc == 0, f"client {cid}: " + (logs / f"client-{cid}.out").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def test_three_clients_and_a_late_joiner_end_bit_identical_each_with_its_own_id(
    tiny_model_dir, files, tmp_path, capsys
) -> None:
    steps = 12
    srv = tmp_path / "server"
    runs = {cid: tmp_path / f"client-{cid}" for cid in range(4)}
    with server(tiny_model_dir, srv, files, steps, "--max-clients", "4",
                "--min-clients", "3") as (proc, address):
        # client 1's own token with client 0's id: refused before anything is written
        spoof = _client_args(tiny_model_dir, files, address, 0, tmp_path / "spoof", steps,
                             token_of=1)
        assert main(spoof) == 2
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        assert not (tmp_path / "spoof").exists() and proc.poll() is None
        procs = {cid: _hosl(*_client_args(tiny_model_dir, files, address, cid, runs[cid], steps),
                            log=tmp_path / f"client-{cid}.out") for cid in range(3)}
        try:
            # the late joiner: from the base model, once the log holds records
            _wait(lambda: _committed(srv) >= 2, "a few steps")
            assert main(_client_args(tiny_model_dir, files, address, 3, runs[3], steps)) == 0
        finally:
            _run_all(procs, tmp_path)
    log = _server_log(srv)
    assert "client id 0 does not belong to the token presented" in log
    joined = [line for line in log.splitlines() if "client 3 (" in line and "joined" in line]
    assert len(joined) == 1 and "holding 0 log records" in joined[0]
    assert int(joined[0].split(" joined at step ")[1].split()[0]) >= 2  # it did join late
    records = _server_records(srv)
    assert [r.step for r in records] == list(range(steps))
    # sequential turns, round-robin over whoever was connected
    assert [r.client for r in records[:3]] == [0, 1, 2]
    assert all(a.client != b.client for a, b in zip(records, records[1:]))
    theta = {cid: _theta_c(run) for cid, run in runs.items()}
    expected = _rebuilt_from_log(records)
    base = split_model(tiny_llama(), 1)[0].state_dict()
    assert any(not torch.equal(base[k], expected[k]) for k in base)  # training moved θ_c
    for cid in range(4):
        _assert_bitwise(expected, theta[cid], f"client {cid} against the server's log")
    # summary.json: each client's own data, sync bytes beside FedAvg's 2 × |θ_c|
    theta_bytes = sum(t.numel() * t.element_size() for t in expected.values())
    sizes = [len(r.encode()) for r in records]
    for cid, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        block = summary["clients"]
        assert block["this_client"]["examples"] == SIZES[cid]
        mine = [s for r, s in zip(records, sizes) if r.client == cid]
        assert block["this_client"]["up_bytes"] == sum(mine)
        assert block["this_client"]["steps"] == len(mine)
        # everything it did not upload itself, it downloaded (the late joiner: from record 0)
        assert block["this_client"]["down_bytes"] == sum(sizes) - sum(mine)
        assert block["fedavg_bytes_per_client_round"] == 2 * theta_bytes
        assert 0 < block["sync_bytes_per_client_round"] < block["fedavg_bytes_per_client_round"]
        assert [c["steps"] for c in block["per_client"]] == [
            sum(r.client == c for r in records) for c in range(4)]
    assert json.loads((srv / "clients.json").read_text())["log_records"] == steps


def test_killed_and_hung_clients_are_dropped_and_a_restarted_one_catches_up(
    tiny_model_dir, files, tmp_path
) -> None:
    steps = 14
    srv = tmp_path / "server"
    runs = {cid: tmp_path / f"client-{cid}" for cid in range(3)}
    with server(tiny_model_dir, srv, files, steps, "--max-clients", "3", "--min-clients", "3",
                "--turn-timeout", "8") as (_, address):
        procs = {cid: _hosl(*_client_args(tiny_model_dir, files, address, cid, runs[cid], steps),
                            "--checkpoint-every", "1", log=tmp_path / f"client-{cid}.out")
                 for cid in range(3)}
        try:
            _wait(lambda: _committed(srv) >= 3, "a few steps")
            procs[1].send_signal(signal.SIGKILL)  # killed: its stream ends at once
            procs[1].wait(30)
            _wait(lambda: "client 1 left" in _server_log(srv), "the server to notice")
            at_kill = _committed(srv)
            procs[2].send_signal(signal.SIGSTOP)  # hung: silent in its turn until the deadline
            _wait(lambda: "refused client" in _server_log(srv)
                  and "(client 2)" in _server_log(srv), "the hung client to be dropped")
            at_drop = _committed(srv)
            procs[2].kill()
            # client 1 restarts from its checkpoint and catches up with the log's tail
            assert main(["client", "--resume", str(runs[1]), "--server", address,
                         "--client-id", "1", "--token-file",
                         str(files["tokens"].parent / "token-1"), "--no-progress"]) == 0
            assert procs[0].wait(DEADLINE_S) == 0
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
    log = _server_log(srv)
    assert "client 2 sent nothing more before its turn's deadline (--turn-timeout 8 s)" in log
    assert "client 2 left" in log
    records = _server_records(srv)
    assert _committed(srv) == steps and at_kill < steps
    # nothing half-applied: every record the log holds is a whole step, and the two clients
    # that finished hold exactly the log replayed onto the base model
    expected = _rebuilt_from_log(records)
    for cid in (0, 1):
        _assert_bitwise(expected, _theta_c(runs[cid]), f"client {cid}")
    assert all(r.client != 2 for r in records if r.step >= at_drop)  # dropped: no more turns
    assert all(r.client != 1 for r in records if at_kill <= r.step < at_drop)
    resumed = [x for x in log.splitlines() if "client 1 (" in x and "joined" in x][-1]
    assert "holding 0 log records" not in resumed  # it restarted from its own checkpoint


def test_what_networked_clients_refuse(tiny_model_dir, files, tmp_path, capsys) -> None:
    """Refusals that need no server, each before anything is written."""
    args = _client_args(tiny_model_dir, files, "127.0.0.1:1", 0, tmp_path / "c", 4)
    cases = [
        (["train", *[a for a in args[1:] if a not in ("--server", "127.0.0.1:1")]],
         "give --server"),
        ([*args, "--clients", "3"], "drop --clients"),
        ([*args, "--client-schedule", "parallel"], "set them on `hosl serve`"),
        ([*args, "--set", "clients.order=sampled"], "set them on `hosl serve`"),
        ([*args, "--set", "clients.fraction=0.5"], "set them on `hosl serve`"),
        ([*args, "--mode", "fo", "--embedding-noise", "all"], "not 'fo'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, message
        assert message in capsys.readouterr().err
    serve = ["serve", "--model", str(tiny_model_dir), "--output", str(tmp_path / "s"),
             "--max-clients", "3", "--port", "0"]
    assert main([*serve, "--min-clients", "4"]) == 2
    assert "--min-clients 4: must be 1..--max-clients (3)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()


def test_the_roster_hands_out_one_turn_at_a_time_and_binds_ids_to_tokens() -> None:
    """The server's turn keeping without a network: who may step, commit and join when."""
    committed = [0]  # the server's committed steps, as its ledger would say
    roster = Roster(max_clients=2, min_clients=2, total_steps=2, committed=lambda: committed[0],
                    tokens={0: "token-a", 1: "token-b"})
    roster.check_token(0, "token-a")
    for cid, token in ((0, "token-b"), (2, "token-a"), (0, None)):
        with pytest.raises(_Refuse, match="does not belong"):
            roster.check_token(cid, token)
    m0, m1 = ClientHello(0, 0, 5, 64), ClientHello(1, 0, 5, 64)
    roster.admit(m0)
    with pytest.raises(_Refuse, match="already connected"):
        roster.admit(ClientHello(0, 0, 5, 64))
    stop, got = threading.Event(), {}
    waiter = threading.Thread(target=lambda: got.update(roster.wait_turn(m0, stop)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # no turn before --min-clients have joined
    roster.admit(m1)
    with pytest.raises(_Refuse, match="already has 2 clients"):
        roster.admit(ClientHello(2, 0, 5, 64))
    waiter.join(10)
    assert got["step"] == 0 and not got["done"] and got["records"] == []
    assert roster.in_turn(m0, 0) and not roster.in_turn(m1, 0) and not roster.in_turn(m0, 1)
    with pytest.raises(_Refuse, match="before the server applied"):
        roster.commit(m0, None)
    committed[0] = 1
    record = ClientUpdate(0, 0, 0.1, 0.0, ((7, 0.5),)).encode()
    with pytest.raises(_Refuse, match="outside its turn"):
        roster.commit(m1, record)
    with pytest.raises(_Refuse, match="not step 0 of client 0"):
        roster.commit(m0, ClientUpdate(0, 1, 0.1, 0.0, ((7, 0.5),)).encode())
    with pytest.raises(_Refuse, match="malformed"):
        roster.commit(m0, record[:-3])
    assert roster.commit(m0, record) == 1
    # client 1 lacks client 0's record: it gets it at once, holding no turn, then its turn
    catch_up = roster.wait_turn(m1, stop)
    assert catch_up["catch_up"] and catch_up["step"] is None and catch_up["records"] == [record]
    assert not roster.holds_turn(m1)
    turn = roster.wait_turn(m1, stop)  # round-robin: client 1 next
    assert turn["step"] == 1 and turn["records"] == [] and not turn["catch_up"]
    assert roster.leave(m1)  # it held the turn: the server must discard its partial step
    committed[0] = 2
    turn = roster.wait_turn(m0, stop)
    assert turn["done"] and turn["records"] == []  # its own record it never downloads
    report = roster.report()
    assert [c["steps"] for c in report["per_client"]] == [1, 0]
    assert report["per_client"][1]["down_bytes"] == len(record)
    assert report["fedavg_bytes_per_client_round"] == 128
    # the server's checkpoint keeps the log and the books, through torch.load(weights_only=True)
    buffer = io.BytesIO()
    torch.save(roster.state_dict(), buffer)
    buffer.seek(0)
    restarted = Roster(max_clients=2, min_clients=2, total_steps=4, committed=lambda: 2)
    restarted.load_state_dict(torch.load(buffer, weights_only=True))
    assert restarted.sync.log.encoded_since(0) == [record] and restarted.report() == report
    with pytest.raises(_Refuse, match="belongs to another run"):
        restarted.admit(ClientHello(1, 2, 5, 64))  # it holds more of the log than the server
    restarted.admit(ClientHello(1, 0, 5, 64))  # a rejoining client from the base model
    assert restarted.wait_turn(restarted.members[1], stop)["records"] == [record]


def _in_thread(call: Callable[[], Any], wait_s: float = 5.0) -> Any:
    """`call()`'s result or exception, from a thread; fails (not hangs) if it blocks."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as err:  # handed back to the test
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait_s)
    assert not thread.is_alive(), "the call blocked"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_turn_holder_cannot_ask_again_nor_keep_its_turn_past_the_deadline() -> None:
    """Asking for a turn while holding one would wait for itself (every client stalls); a
    holder that stays busy past --turn-timeout must lose the turn however chatty it is."""
    roster = Roster(max_clients=2, min_clients=1, total_steps=5, committed=lambda: 0,
                    turn_timeout=0.4)
    m0, m1 = ClientHello(0, 0, 5, 64), ClientHello(1, 0, 5, 64)
    roster.admit(m0)
    roster.admit(m1)
    stop = threading.Event()
    assert roster.wait_turn(m0, stop)["step"] == 0
    with pytest.raises(_Refuse, match="while holding the turn of step 0"):
        _in_thread(lambda: roster.wait_turn(m0, stop))
    assert roster.holds_turn(m0)  # refused, not handed a second turn
    assert not roster.overtime(m0) and not roster.overtime(m1)  # inside its deadline
    time.sleep(0.5)
    assert roster.overtime(m0) and not roster.overtime(m1)  # only the holder is over time
    assert roster.leave(m0)  # its session ends on the refusal: the turn passes on
    assert _in_thread(lambda: roster.wait_turn(m1, stop))["step"] == 0
    assert not roster.overtime(m1)  # the deadline counts from its own grant


class _StubServer:
    """The server state a many-client session touches, counting discarded partial steps."""

    def __init__(self) -> None:
        self.stopping, self.lock = threading.Event(), threading.Lock()
        self.idle_timeout, self.discards, self.session_ends = 5.0, 0, 0
        self.compute_dtype, self.hidden_size, self.bounds = torch.float32, 8, None
        self.run_fingerprint = None
        self.log = SimpleNamespace(info=lambda *a: None, warning=lambda *a: None)
        self.ledger = SimpleNamespace(committed=0, open_step=None, abort=self._discarded)
        self.party = SimpleNamespace(phase=lambda name: contextmanager(lambda: (yield))(),
                                     discard_partial_step=lambda: None)

    def _discarded(self) -> None:
        self.discards += 1

    def on_session_end(self) -> None:
        self.session_ends += 1


def _serve(servicer: MultiClientServicer, member: ClientHello, *heads: bytes) -> None:
    """Run `member`'s session loop over `heads` (after the welcome) until it ends."""
    queue = list(heads)

    def next_frame(timeout: float) -> bytes:
        if not queue:
            raise InboxClosed()
        return queue.pop(0)

    inbox = SimpleNamespace(next=next_frame, assembler=SimpleNamespace(limit=1 << 20))
    for _ in servicer._serve_member(inbox, torch.float32, {"max_length": 8}, member):
        pass


def _two_sessions_first_holds_the_turn() -> tuple:
    """A servicer over a stand-in server with clients 0 and 1 admitted; client 0 holds step 0."""
    stub = _StubServer()
    roster = Roster(max_clients=2, min_clients=2, total_steps=5, committed=lambda: 0)
    servicer = MultiClientServicer(stub, roster)
    m0, m1 = ClientHello(0, 0, 5, 64), ClientHello(1, 0, 5, 64)
    roster.admit(m0)
    roster.admit(m1)
    assert roster.wait_turn(m0, stub.stopping)["step"] == 0
    return stub, roster, servicer, m0, m1


def test_a_session_without_the_turn_cannot_discard_the_holders_partial_step() -> None:
    """Only steps in turn and evaluations reach the model; a refused request from a session that
    does not hold the turn leaves the holder's open step alone; the holder past its turn deadline
    is refused at its next message."""
    stub, roster, servicer, m0, m1 = _two_sessions_first_holds_the_turn()
    malformed_eval = encode("EvalRequest", {}, {})  # lacks its fields: refused on decoding
    with pytest.raises(_Refuse, match="unexpected message 'bogus'"):
        _serve(servicer, m1, encode("bogus", {}, {}))
    with pytest.raises(_Refuse, match="malformed"):
        _serve(servicer, m1, malformed_eval)
    assert stub.discards == 0  # the holder's step survives both
    with pytest.raises(_Refuse, match="malformed"):
        _serve(servicer, m0, malformed_eval)
    assert stub.discards == 1  # the holder's own refused request does discard its step
    roster.turn_timeout = 0.0  # its turn deadline has passed: the next message ends it
    with pytest.raises(_Refuse, match="longer than --turn-timeout"):
        _serve(servicer, m0, encode("turn", {}, {}))


def test_a_commit_after_the_turn_deadline_lands_when_its_step_was_applied() -> None:
    """The server applied the holder's step inside the deadline and its commit arrives just
    after: refusing it would leave θ_s a step that no client's log holds. A step not yet applied
    is refused as before."""
    stub = _StubServer()
    applied = {"steps": 0}
    roster = Roster(max_clients=2, min_clients=2, total_steps=5, committed=lambda: applied["steps"])
    servicer = MultiClientServicer(stub, roster)
    m0, m1 = ClientHello(0, 0, 5, 64), ClientHello(1, 0, 5, 64)
    roster.admit(m0)
    roster.admit(m1)
    assert roster.wait_turn(m0, stub.stopping)["step"] == 0
    roster.turn_timeout = 0.0  # the deadline has passed
    with pytest.raises(_Refuse, match="longer than --turn-timeout"):
        _serve(servicer, m0, encode("commit", {}, {}))  # its step is not applied: refused
    assert roster.holder is m0 and roster.books[0].steps == 0 and not roster.commit_due()
    applied["steps"] = 1  # the server step is applied; the commit is late
    assert roster.commit_due()  # θ_s is a step ahead of the log: no checkpoint now (serve.py)
    _serve(servicer, m0, encode("commit", {}, {}))
    assert roster.holder is None and roster.books[0].steps == 1  # committed; the turn passes
    assert not roster.commit_due()


def test_the_holders_frame_wait_is_what_is_left_of_its_turn() -> None:
    """A turn of many frames must end at its deadline: the holder waits for each frame only
    what is left of its turn, every other session the idle timeout."""
    stub, roster, servicer, m0, m1 = _two_sessions_first_holds_the_turn()
    roster.turn_timeout = 30.0  # more than the idle timeout (5 s) until it is nearly over
    inbox0, inbox1 = object(), object()
    servicer._member_of[id(inbox0)], servicer._member_of[id(inbox1)] = m0, m1
    assert servicer._frame_timeout(inbox0) == servicer._frame_timeout(inbox1) == 5.0
    roster.granted_at -= 28.0  # 28 s of the turn gone: 2 s left
    assert 1.0 < servicer._frame_timeout(inbox0) <= 2.0
    assert servicer._frame_timeout(inbox1) == 5.0
    roster.granted_at -= 10.0  # over time: the next frame is read at once, then refused
    assert servicer._frame_timeout(inbox0) == 0.05


def test_the_end_of_call_callback_never_waits_for_the_step_lock() -> None:
    """gRPC runs it on the thread that delivers every stream's frames: waiting there for a step
    in progress (which waits for its frames) would stall the holder until it timed out."""
    stub, roster, servicer, m0, m1 = _two_sessions_first_holds_the_turn()
    stub.ledger.open_step = 0
    with stub.lock:  # the holder is inside its step
        _in_thread(lambda: servicer._call_ended(m1), wait_s=2)  # a waiter's call ended
        _in_thread(lambda: servicer._call_ended(m0), wait_s=2)  # and then the holder's
    deadline = time.monotonic() + 10
    while stub.session_ends < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # both left in the end (checkpoints written), the holder's partial step discarded once
    assert stub.session_ends == 2 and stub.discards == 1
    assert roster.members == {} and roster.holder is None


# Hardening: who may join a log, what a record may hold, catch-up and books ----------------

EMBEDDING = "model.embed_tokens.weight"  # the tiny model's embedding (one row per word)


def _digest_of(records: list[bytes]) -> str:
    """The log's chain digest, computed here from its definition (docs/many_clients.md)."""
    digest = hashlib.sha256(b"hosl update log").digest()
    for encoded in records:
        digest = hashlib.sha256(digest + encoded).digest()
    return digest.hex()


def _record(step: int, client: int, *, pairs: int = 1, lr: float = 0.1, seed: int = 7,
            rows: dict | None = None) -> bytes:
    coefs = tuple((seed + i, 0.5 - 0.1 * i) for i in range(pairs))
    return ClientUpdate(step, client, lr, 0.0, coefs, rows).encode()


def test_a_client_ahead_of_the_log_or_apart_from_it_is_refused() -> None:
    """A server restarted from an older checkpoint, whose log has since taken another client's
    step at a position a client had already filled with its own: same cursor, other records."""
    records = [_record(s, s % 2, seed=10 * s) for s in range(3)]
    roster = Roster(max_clients=4, min_clients=1, total_steps=9, committed=lambda: 2)
    roster.sync.log.append(ClientUpdate.decode(r) for r in records[:2])  # the restarted log
    lost = _record(2, 1, seed=99)  # client 1's step the old server confirmed, then lost
    with pytest.raises(_Refuse, match="holds 2: the server restarted .* start it afresh"):
        roster.admit(ClientHello(1, 3, 5, 64, _digest_of([*records[:2], lost])))
    roster.sync.log.append([ClientUpdate.decode(records[2])])  # another client's step 2
    with pytest.raises(_Refuse, match="not the server's .* start it afresh from the base"):
        roster.admit(ClientHello(1, 3, 5, 64, _digest_of([*records[:2], lost])))
    with pytest.raises(_Refuse, match="not the server's"):  # another run's first record
        roster.admit(ClientHello(2, 1, 5, 64, _digest_of([lost])))
    assert roster.members == {} and roster.books == {}
    roster.admit(ClientHello(1, 2, 5, 64, _digest_of(records[:2])))  # behind, same records
    roster.admit(ClientHello(3, 0, 5, 64))  # the base model
    with pytest.raises(_Refuse, match="'digest' is not a sha256"):
        ClientHello.parse({"id": 0, "cursor": 0, "examples": 1, "theta_bytes": 1})
    hello = {"id": 0, "cursor": 3, "examples": 1, "theta_bytes": 1, "digest": _digest_of(records)}
    assert ClientHello.parse(hello).digest == _digest_of(records)
    # its catch-up brings the log's last record and the digest it must reach
    answer = roster.wait_turn(roster.members[1], threading.Event())
    assert answer["records"] == records[2:] and answer["digest"] == _digest_of(records)


def test_the_first_clients_are_compared_with_each_other_adapters_and_seeds_included() -> None:
    base = TrainConfig()
    lora = replace(base, client=replace(base.client, adapter="lora"))
    runs = {"base": base, "seed": replace(base, seed=1), "lora": lora,
            "rank": replace(lora, client=replace(lora.client, lora_rank=4)),
            "every row": replace(base, zo=replace(base.zo, embedding_noise="all"))}
    fingerprint = {name: run_fingerprint(cfg) for name, cfg in runs.items()}
    # every-row noise adds no key: a server checkpointed before the setting existed still
    # matches the clients of its run
    assert "embedding_noise" not in fingerprint["every row"]
    roster = Roster(max_clients=3, min_clients=3, total_steps=4, committed=lambda: 0)
    roster.admit(ClientHello(0, 0, 5, 64), fingerprint["base"])
    for name, field_name in (("seed", "seed"), ("lora", "client_adapter"),
                             ("every row", "embedding_noise")):
        with pytest.raises(_Refuse, match=f"already connected train another run .*{field_name}"):
            roster.admit(ClientHello(1, 0, 5, 64), fingerprint[name])
    roster.admit(ClientHello(1, 0, 5, 64), fingerprint["base"])
    assert sorted(roster.members) == [0, 1]
    adapters = Roster(max_clients=2, min_clients=2, total_steps=4, committed=lambda: 0)
    adapters.admit(ClientHello(0, 0, 5, 64), fingerprint["lora"])
    with pytest.raises(_Refuse, match="client_lora_rank: server run 8, client 4"):
        adapters.admit(ClientHello(1, 0, 5, 64), fingerprint["rank"])
    # a fresh server whose only client left before any step takes the next client's run
    adapters.leave(adapters.members[0])
    adapters.admit(ClientHello(1, 0, 5, 64), fingerprint["rank"])


def test_a_record_that_breaks_a_rule_is_refused_and_changes_nothing() -> None:
    """Every client replays a logged record: row ids beyond the embedding, a wrong number of
    pairs, a learning rate above the run's, a non-finite number or a non-canonical encoding would
    make each replay fail or differ, so the log never takes one."""
    part = split_model(tiny_llama(), 1)[0]
    target = ZoTarget(part)
    assert target.row_wise == {EMBEDDING}
    vocab = dict(target.named)[EMBEDDING].shape[0]
    committed = [0]
    roster = Roster(max_clients=1, min_clients=1, total_steps=4, committed=lambda: committed[0],
                    grad_accum=2, row_limits={EMBEDDING: vocab})
    member = ClientHello(0, 0, 5, 64)
    roster.admit(member, {"q": 2, "client_lr": 0.01, "seed": 0})
    assert roster.wait_turn(member, threading.Event())["step"] == 0
    committed[0] = 1
    rows = {7: {EMBEDDING: torch.tensor([1, 5, vocab - 1])}}
    good = _record(0, 0, pairs=4, lr=0.005, rows=rows)
    duplicate = bytearray(ClientUpdate(0, 0, 0.005, 0.0, ((7, 0.5), (7, 0.25), (8, 0.1),
                                                          (9, 0.1)), rows).encode())
    struct.pack_into("<I", duplicate, 36 + 4 * 16, 1)  # the rows' seed named by its 2nd copy
    bad = {
        f"row ids .* 0..{vocab - 1}": _record(0, 0, pairs=4, lr=0.005,
                                              rows={7: {EMBEDDING: torch.tensor([1, vocab])}}),
        "not sorted": _record(0, 0, pairs=4, lr=0.005, rows={7: {EMBEDDING: torch.tensor([5, 1])}}),
        "not an embedding": _record(0, 0, pairs=4, lr=0.005,
                                    rows={7: {"model.norm.weight": torch.tensor([0])}}),
        "holds 2 .* pairs; .* q × grad_accum = 2 × 2": _record(0, 0, pairs=2, lr=0.005),
        "learning rate 0.02 is outside 0..0.01": _record(0, 0, pairs=4, lr=0.02),
        "learning rate -0.001": _record(0, 0, pairs=4, lr=-0.001),
        "not finite": _record(0, 0, pairs=4, lr=float("nan")),
        "canonical": bytes(duplicate),
    }
    for message, record in bad.items():
        with pytest.raises(_Refuse, match=message):
            roster.commit(member, record)
        assert len(roster.sync.log) == 0 and roster.holds_turn(member), message
        assert vars(roster.books[0]) == {"cursor": 0, "down_bytes": 0, "up_bytes": 0, "steps": 0}
    assert roster.commit(member, good) == 1
    assert roster.sync.log.encoded_since(0) == [good]
    assert roster.sync.log.digest(1).hex() == _digest_of([good])
    replay(target, roster.sync.log.since(0))  # the good record replays on the tiny model


def test_a_late_joiner_catches_up_in_pieces_holding_no_turn_and_no_deadline() -> None:
    """A long log against a tiny --turn-timeout: each piece of the catch-up takes longer to
    replay than a turn may last, yet the joiner is not dropped, and the other client steps
    meanwhile instead of waiting for it."""
    stub = _StubServer()
    log_length = 150
    roster = Roster(max_clients=2, min_clients=1, total_steps=1000,
                    committed=lambda: log_length, turn_timeout=0.2)
    roster.sync.log.append(ClientUpdate.decode(_record(s, 1, seed=s)) for s in range(log_length))
    servicer = MultiClientServicer(stub, roster)
    late, other = ClientHello(0, 0, 5, 64), ClientHello(1, log_length, 5, 64,
                                                        roster.sync.log.digest(log_length).hex())
    roster.admit(late)
    roster.admit(other)
    answers: list[dict] = []
    wait_turn = roster.wait_turn

    def spied(member: ClientHello, stopping: threading.Event) -> dict:
        answers.append(wait_turn(member, stopping))
        return dict(answers[-1])  # the session pops the records from its copy

    roster.wait_turn = spied
    waits: list[float] = []
    frames = [encode("turn", {}, {}) for _ in range(4)]

    def next_frame(timeout: float) -> bytes:
        waits.append(timeout)
        if len(waits) == 2:  # client 1 steps while client 0 replays its first piece
            assert _in_thread(lambda: wait_turn(other, stub.stopping))["step"] == log_length
            roster.leave(other)  # (its step is not the point here)
        if not frames:
            raise InboxClosed()
        time.sleep(0.3 if len(waits) > 1 else 0)  # replaying the previous answer's records
        return frames.pop(0)

    inbox = SimpleNamespace(next=next_frame, assembler=SimpleNamespace(limit=1 << 20))
    for _ in servicer._serve_member(inbox, torch.float32, {"max_length": 8}, late):
        pass
    assert [len(a["records"]) for a in answers] == [64, 64, 22, 0]
    assert [a["catch_up"] for a in answers] == [True, True, True, False]
    assert answers[-1]["step"] == log_length and roster.holds_turn(late)
    assert answers[2]["digest"] == roster.sync.log.digest(log_length).hex()
    # replaying, it waited the idle timeout; holding its turn, what is left of the turn timeout
    assert waits[:4] == [stub.idle_timeout] * 4 and 0.1 < waits[4] <= 0.2 and len(waits) == 5


def test_books_are_made_for_the_ids_that_join_and_their_number_is_bounded() -> None:
    roster = Roster(max_clients=2, min_clients=1, total_steps=4, committed=lambda: 0)
    top = ClientHello(MAX_CLIENT_ID - 1, 0, 5, 64)
    roster.admit(top)
    assert list(roster.books) == [MAX_CLIENT_ID - 1] and len(roster.state_dict()["books"]) == 1
    report = roster.report()
    assert report["n"] == 1 and report["ids"] == [MAX_CLIENT_ID - 1]
    roster.leave(top)
    for cid in range(IDS_PER_SLOT * 2 - 1):  # ids that join and leave, one after the other
        roster.admit(hello := ClientHello(cid, 0, 5, 64))
        roster.leave(hello)
    assert len(roster.books) == IDS_PER_SLOT * 2
    with pytest.raises(_Refuse, match="has seen 32 client ids"):
        roster.admit(ClientHello(1000, 0, 5, 64))
    roster.admit(ClientHello(3, 0, 5, 64))  # an id that trained before may come back
    # the checkpoint keeps the books by id
    restarted = Roster(max_clients=2, min_clients=1, total_steps=4, committed=lambda: 0)
    restarted.load_state_dict(roster.state_dict())
    assert restarted.books == roster.books and restarted.report() == roster.report()
    # an older checkpoint kept a list indexed by id: ids 0 and 5 joined, 1..4 are empty fillers
    older = {"log": roster.state_dict()["log"], "sizes": {"0": 5, "5": 7}, "last": 5,
             "books": [{"cursor": 0, "down_bytes": 0, "up_bytes": 0, "steps": 2}]
             + [{"cursor": 0, "down_bytes": 0, "up_bytes": 0, "steps": 0}] * 5}
    restarted.load_state_dict(older)
    assert sorted(restarted.books) == [0, 5] and restarted.books[0].steps == 2


def test_a_real_server_compares_the_first_clients_with_each_other_and_checks_digests() -> None:
    """The hello's run fingerprint and log position reach `Roster.admit` over gRPC: a client of
    another seed than the server's is refused even as the first; with none committed yet, a
    second client of another run (another q) is refused, and so is a client whose digest is not
    the log's."""
    cfg = _grpc_cfg("hosl")
    model = tiny_llama()
    party = build_run(cfg, model).server
    identity = identity_for("tiny", model.config, 1, cfg.mode, "float32", cfg.grad_accum)
    state = ServerState(party, identity, StepLedger(), hidden_size=32,
                        log=logging.getLogger("test-server"), seed=cfg.seed)
    roster = Roster(max_clients=3, min_clients=3, total_steps=4,
                    committed=lambda: state.ledger.committed)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         handlers=[MultiClientServicer(state, roster).handler()],
                         options=grpc_options(server=True))
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    transports = []

    def connect(cid: int, run: TrainConfig, digest: str = _digest_of([])) -> None:
        hello = {"id": cid, "cursor": 0, "digest": digest, "examples": 4, "theta_bytes": 64}
        transport = make_transport(run, model, RemoteOptions(address, reconnect_timeout=0),
                                   client=hello)
        transports.append(transport)
        transport.connect()

    try:
        with pytest.raises(HoslError, match=f"server runs with seed {cfg.seed}, the client with "
                                            f"seed {cfg.seed + 1}"):
            connect(0, replace(cfg, seed=cfg.seed + 1))
        assert not roster.members and roster.run is None
        connect(0, cfg)
        with pytest.raises(HoslError, match="already connected train another run .*q: server"):
            connect(1, replace(cfg, zo=replace(cfg.zo, q=cfg.zo.q + 1)))
        with pytest.raises(HoslError, match="not the server's"):
            connect(1, cfg, digest=_digest_of([_record(0, 0)]))
        connect(1, cfg)
        assert sorted(roster.members) == [0, 1] and roster.run == run_fingerprint(cfg)
    finally:
        for transport in transports:
            transport.close()
        server.stop(0).wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_killed_server_resumes_its_log_and_the_clients_resume_bit_identical(
    tiny_model_dir, files, tmp_path
) -> None:
    """Two client processes train with a server that is killed (SIGKILL) mid-training and
    restarted with --resume; the clients, cut off, resume from their checkpoints (one after the
    other, in this process) and end holding the server's log replayed onto the base model."""
    steps = 10
    srv = tmp_path / "server"
    runs = {cid: tmp_path / f"client-{cid}" for cid in range(2)}
    port = str(_free_port())  # fixed: the clients start with the server and wait for it
    address = f"127.0.0.1:{port}"
    many = ["--max-clients", "2", "--min-clients", "2", "--client-tokens", str(files["tokens"]),
            "--port", port]
    first = _hosl("serve", "--model", str(tiny_model_dir), "--split-layer", "1", "--mode", "hosl",
                  "--server-lr", "0.1", "--optimizer", "adamw", "--steps", str(steps),
                  "--output", str(srv), "--checkpoint-every", "1", "--set", "memory_steps=0",
                  *many, log=tmp_path / "serve.out")
    procs = {cid: _hosl(*_client_args(tiny_model_dir, files, address, cid, runs[cid], steps),
                        "--checkpoint-every", "1", log=tmp_path / f"client-{cid}.out")
             for cid in range(2)}
    second = None
    try:
        _wait(lambda: _committed(srv) >= 4 or first.poll() is not None, "a few steps")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        at_kill = _committed(srv)
        for proc in procs.values():  # their sessions ended with the server: they stop
            assert proc.wait(DEADLINE_S) != 0
        second = _hosl("serve", "--resume", str(srv), *many, log=tmp_path / "serve.out")
        for cid in range(2):
            assert main(["client", "--resume", str(runs[cid]), "--server", address,
                         "--client-id", str(cid), "--no-progress", "--token-file",
                         str(files["tokens"].parent / f"token-{cid}")]) == 0
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        for proc in [first, second, *procs.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
    assert 4 <= at_kill < steps and "resumed" in _server_log(srv)
    records = _server_records(srv)
    assert [r.step for r in records] == list(range(steps))  # every step once, none lost
    assert {r.client for r in records[:at_kill]} == {0, 1}  # both stepped before the kill
    expected = _rebuilt_from_log(records)
    for cid in range(2):
        _assert_bitwise(expected, _theta_c(runs[cid]), f"client {cid} against the server's log")
