"""Rounds over the network (`hosl serve --set clients.order=sampled` / `clients.fraction=F`):
the server's `Roster` hands turns out round by round, each round holding m = round(F · n) of the
n clients that can step when it begins, drawn at random (`sampled`) or in turn (`round-robin`).

Driven without a network: each test plays the clients one turn at a time (the one the roster
will hand the turn to asks for it, replays what it lacks, the server applies its step, it
commits a record), so the order of turns is the roster's alone.
"""

from __future__ import annotations

import io
import json
import threading

import pytest
import torch

from hosl.federated.records import ClientUpdate
from hosl.transport.sessions import ClientHello, Roster
from test_networked_clients import (  # noqa: F401  (files: a fixture)
    _assert_bitwise,
    _client_args,
    _hosl,
    _rebuilt_from_log,
    _run_all,
    _server_records,
    _theta_c,
    files,
    server,
)

N = 4


def _roster(order: str, fraction: float, seed: int = 0, steps: int = 40,
            parallel: bool = False) -> Roster:
    committed = [0]
    roster = Roster(max_clients=N, min_clients=N, total_steps=steps,
                    committed=lambda: committed[0], order=order, fraction=fraction, seed=seed,
                    parallel=parallel)
    roster.applied = committed  # type: ignore[attr-defined]  # the server's ledger, by hand
    for cid in range(N):
        roster.admit(ClientHello(cid, 0, 5, 64))
    return roster


def _restarted(roster: Roster, order: str, fraction: float, parallel: bool = False) -> Roster:
    """A new server's roster from `roster`'s checkpoint (through torch.load(weights_only=True)),
    its ledger at `roster`'s, every client rejoined holding the log (not held-back records)."""
    buffer = io.BytesIO()
    torch.save(roster.state_dict(), buffer)
    buffer.seek(0)
    applied = [roster.applied[0]]  # type: ignore[attr-defined]
    restarted = Roster(max_clients=N, min_clients=N, total_steps=40, committed=lambda: applied[0],
                       order=order, fraction=fraction, parallel=parallel)
    restarted.applied = applied  # type: ignore[attr-defined]
    restarted.load_state_dict(torch.load(buffer, weights_only=True))
    held = len(roster.sync.log)
    for cid in range(N):
        restarted.admit(ClientHello(cid, held, 5, 64, roster.sync.log.digest(held).hex()))
    return restarted


def _take_turns(roster: Roster, turns: int, seen: list | None = None) -> list[int]:
    """Who stepped, for `turns` steps: each time the client whose turn it is asks (catching up
    first if it lacks records), the server applies its step, and it commits its record.
    `seen`: each turn's (client, log length its θ_c holds when it steps, records it got)."""
    stop, order = threading.Event(), []
    for _ in range(turns):
        cid = roster._next_client()
        assert cid is not None
        member = roster.members[cid]
        answer = roster.wait_turn(member, stop)
        got = list(answer["records"])
        while answer["catch_up"]:
            answer = roster.wait_turn(member, stop)
            got += answer["records"]
        if seen is not None:
            seen.append((cid, answer["log"], [ClientUpdate.decode(r).step for r in got],
                         answer["deferred"]))
        step = answer["step"]
        assert roster.holds_turn(member) and step == roster.applied[0]  # type: ignore[attr-defined]
        roster.applied[0] += 1  # type: ignore[attr-defined]
        roster.commit(member, ClientUpdate(step, cid, 0.1, 0.0, ((step, 0.5),)).encode())
        order.append(cid)
    return order


def _rounds(order: list[int], m: int) -> list[list[int]]:
    return [order[i:i + m] for i in range(0, len(order), m)]


def test_sampled_rounds_draw_distinct_clients_by_seed_and_count_rounds() -> None:
    turns = 24
    order = _take_turns(_roster("sampled", 0.5), turns)
    rounds = _rounds(order, 2)
    assert all(len(set(r)) == 2 for r in rounds)  # a round holds a client at most once
    assert len({tuple(sorted(r)) for r in rounds}) > 1  # not the same pair every round
    assert set(order) == set(range(N))  # 12 draws of 2 of 4 reach every client
    assert order == _take_turns(_roster("sampled", 0.5), turns)  # a function of the seed
    assert order != _take_turns(_roster("sampled", 0.5, seed=1), turns)
    again = _roster("sampled", 0.5)
    _take_turns(again, turns)
    report = again.report()
    assert (report["order"], report["fraction"], report["per_round"], report["rounds"]) == (
        "sampled", 0.5, 2, 12)
    # sampled with every client per round: each round is a permutation of all four
    full = _rounds(_take_turns(_roster("sampled", 1.0), 12), N)
    assert all(sorted(r) == list(range(N)) for r in full)
    assert len({tuple(r) for r in full}) > 1


def test_partial_round_robin_rounds_take_the_next_clients_in_turn() -> None:
    assert _take_turns(_roster("round-robin", 0.5), 8) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert _take_turns(_roster("round-robin", 0.25), 5) == [0, 1, 2, 3, 0]
    assert _roster("round-robin", 0.5).rounds is not None  # rounds, not plain turns


def test_a_drawn_client_that_leaves_is_dropped_from_its_round() -> None:
    roster = _roster("round-robin", 0.5)
    assert _take_turns(roster, 1) == [0]  # round 0 is clients 0 and 1
    assert roster.round_left == [1]
    roster.leave(roster.members[1])
    # the round's rest is gone: the next round draws from the three left, after client 0
    assert _take_turns(roster, 4) == [2, 3, 0, 2]
    assert 1 not in roster.round_left


def test_a_restarted_server_goes_on_with_the_round_it_was_in() -> None:
    whole = _take_turns(_roster("sampled", 0.5), 9)
    roster = _roster("sampled", 0.5)
    first = _take_turns(roster, 5)  # mid-round: round 2 has one client left
    assert len(roster.round_left) == 1
    restarted = _restarted(roster, "sampled", 0.5)
    assert first + _take_turns(restarted, 4) == whole


@pytest.mark.parametrize("order, fraction", [("round-robin", 1.0)])
def test_plain_turns_keep_no_rounds(order: str, fraction: float) -> None:
    roster = _roster(order, fraction)
    assert roster.rounds is None
    assert _take_turns(roster, 6) == [0, 1, 2, 3, 0, 1]
    assert roster.report()["rounds"] == 2  # ⌈6 participations / 4 clients⌉


def test_real_clients_in_sampled_rounds_end_bit_identical(
    tiny_model_dir, files, tmp_path  # noqa: F811  (files: the imported fixture)
) -> None:
    """`hosl serve --set clients.order=sampled --set clients.fraction=0.67` with three `hosl
    client` processes: rounds of two distinct clients, and every client ends holding the
    server's log replayed onto the base model, bit for bit."""
    steps, srv = 8, tmp_path / "server"
    runs = {cid: tmp_path / f"client-{cid}" for cid in range(3)}
    with server(tiny_model_dir, srv, files, steps, "--max-clients", "3", "--min-clients", "3",
                "--set", "clients.order=sampled", "--set", "clients.fraction=0.67"
                ) as (_, address):
        procs = {cid: _hosl(*_client_args(tiny_model_dir, files, address, cid, runs[cid], steps),
                            log=tmp_path / f"client-{cid}.out") for cid in range(3)}
        _run_all(procs, tmp_path)
    records = _server_records(srv)
    assert [r.step for r in records] == list(range(steps))
    rounds = _rounds([r.client for r in records], 2)
    assert all(len(set(r)) == 2 for r in rounds)
    report = json.loads((srv / "clients.json").read_text())
    assert (report["order"], report["per_round"], report["rounds"]) == ("sampled", 2, 4)
    expected = _rebuilt_from_log(records)
    for cid, run in runs.items():
        _assert_bitwise(expected, _theta_c(run), f"client {cid} against the server's log")


def test_parallel_rounds_hold_their_records_back_until_the_round_ends() -> None:
    """Every client of a round steps on the θ_c the round began with: nothing the round's
    clients commit reaches the log (nor any client) before the round ends, then all of it, in
    the round's order, to everyone, its own record included."""
    roster, seen = _roster("round-robin", 1.0, steps=8, parallel=True), []
    assert _take_turns(roster, 8, seen) == [0, 1, 2, 3, 0, 1, 2, 3]
    # round 0: every client steps on the base θ_c (log length 0) and receives nothing
    assert [(log, got) for _, log, got, _ in seen[:4]] == [(0, [])] * 4
    # round 1: its first client gets all four records of round 0, its own (step 0) included,
    # and the round's later clients get them too when their turn comes, still at log length 4
    assert seen[4][1:3] == (4, [0, 1, 2, 3])
    assert [(log, got) for _, log, got, _ in seen[5:]] == [(4, [0, 1, 2, 3])] * 3
    assert all(deferred for *_, deferred in seen)
    assert len(roster.sync.log) == 4 and len(roster.pending) == 4  # round 1 still held back
    # the run is over: the last round joins the log and reaches everyone in the final answer
    done = roster.wait_turn(roster.members[0], threading.Event())
    assert done["done"] and [ClientUpdate.decode(r).step for r in done["records"]] == [4, 5, 6, 7]
    assert [r.step for r in roster.sync.log.since(0)] == list(range(8))
    assert roster.report()["schedule"] == "parallel"
    # sequential rounds (the same order) pass each record on at the next turn instead
    sequential, seen = _roster("round-robin", 0.99, steps=8), []
    _take_turns(sequential, 8, seen)
    assert [log for _, log, _, _ in seen] == list(range(8))
    assert not any(deferred for *_, deferred in seen)


def test_a_restarted_parallel_server_keeps_the_round_it_held_back() -> None:
    whole = _roster("sampled", 0.5, parallel=True)
    _take_turns(whole, 7)
    roster = _roster("sampled", 0.5, parallel=True)
    _take_turns(roster, 5)  # round 2 has one record held back
    assert len(roster.pending) == 1
    restarted = _restarted(roster, "sampled", 0.5, parallel=True)
    _take_turns(restarted, 2)
    assert restarted.sync.log.encoded_since(0) == whole.sync.log.encoded_since(0)
    assert [u.step for u, _ in restarted.pending] == [u.step for u, _ in whole.pending]


def test_real_clients_in_parallel_rounds_end_bit_identical(
    tiny_model_dir, files, tmp_path  # noqa: F811  (files: the imported fixture)
) -> None:
    """`hosl serve --client-schedule parallel` with three `hosl client` processes: each keeps
    θ_c through its own step and applies its record with the round's others (applying it at
    once as well would leave it off the log's θ_c), ending bit-identical to the log."""
    steps, srv = 7, tmp_path / "server"
    runs = {cid: tmp_path / f"client-{cid}" for cid in range(3)}
    with server(tiny_model_dir, srv, files, steps, "--max-clients", "3", "--min-clients", "3",
                "--client-schedule", "parallel") as (_, address):
        procs = {cid: _hosl(*_client_args(tiny_model_dir, files, address, cid, runs[cid], steps),
                            log=tmp_path / f"client-{cid}.out") for cid in range(3)}
        _run_all(procs, tmp_path)
    records = _server_records(srv)
    assert [r.step for r in records] == list(range(steps))
    assert [r.client for r in records] == [0, 1, 2, 0, 1, 2, 0]
    assert json.loads((srv / "clients.json").read_text())["schedule"] == "parallel"
    expected = _rebuilt_from_log(records)
    for cid, run in runs.items():
        _assert_bitwise(expected, _theta_c(run), f"client {cid} against the server's log")
