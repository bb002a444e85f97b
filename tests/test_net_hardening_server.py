"""A hostile or careless peer against an in-process hosl server: poisoned steps are refused and
change nothing, silent and idle streams time out, a waiting client is told the server is busy, a
hello must say which run it belongs to."""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from conftest import WORDS, tiny_llama
from hosl.build import build_run
from hosl.errors import HoslError
from hosl.protocol import HoslStepRequest
from hosl.transport.codec import encode
from hosl.transport.framing import grpc_options
from hosl.transport.grpc_client import _Broken, _Stream
from hosl.transport.grpc_server import FULL_METHOD
from hosl.transport.guard import ModelBounds
from hosl.transport.messages import from_bytes
from hosl.transport.streaming import request_frames
from test_grpc_transport import (
    Served,
    _batches,
    _cfg,
    _client,
    _hosl_request,
    _raw_stream,
    serving,
)

BOUNDS = ModelBounds(max_positions=64, vocab_size=len(WORDS))  # tiny_llama's


def _send(stream: _Stream, req: HoslStepRequest) -> None:
    head, parts = request_frames(req, torch.float32)
    for frame in [head, *parts]:
        stream.send(frame)


def _longer(req: HoslStepRequest, length: int) -> HoslStepRequest:
    """The same request with every sequence padded to `length` tokens."""
    rows, old = req.batch.attention_mask.shape
    pad = length - old

    def wider(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(rows, pad, *t.shape[2:])], dim=1)

    req.batch.attention_mask = wider(req.batch.attention_mask)
    req.batch.position_ids = torch.cat(
        [req.batch.position_ids, torch.arange(old, length).expand(rows, pad)], dim=1
    )
    req.clean = wider(req.clean)
    req.perturbed = [wider(t) for t in req.perturbed]
    return req


def _poison(req: HoslStepRequest, how: str) -> HoslStepRequest:
    # the client computed these under inference mode; writable copies to poison
    req.clean = req.clean.clone()
    req.perturbed = [t.clone() for t in req.perturbed]
    spec = dataclasses.replace(req.batch.spec, tokens=req.batch.spec.tokens.clone())
    req.batch = dataclasses.replace(
        req.batch,
        attention_mask=req.batch.attention_mask.clone(),
        position_ids=req.batch.position_ids.clone(),
        spec=spec,
    )
    if how == "nan clean":
        req.clean[0, 0, 0] = float("nan")
    elif how == "1e38 clean":
        req.clean.fill_(1e38)
    elif how == "inf perturbed":
        req.perturbed[1][0, 0, 0] = float("inf")
    elif how == "position 1e12":
        req.batch.position_ids[0, -1] = 10**12
    elif how == "length 80":
        _longer(req, 80)
    elif how == "token past the vocabulary":
        req.batch.spec.tokens[0] = len(WORDS) + 5
    return req


POISONS = [
    "nan clean",
    "1e38 clean",
    "inf perturbed",
    "position 1e12",
    "length 80",
    "token past the vocabulary",
]


@pytest.mark.parametrize("how", POISONS)
def test_a_poisoned_step_is_refused_and_changes_nothing(tokenizer, how) -> None:
    cfg = _cfg("hosl")
    client = build_run(cfg, tiny_llama())
    (batch,) = _batches(tokenizer, 0, 1)
    with serving(cfg, bounds=BOUNDS) as served:
        before = copy.deepcopy(served.state.party.part.state_dict())
        stream = _raw_stream(served, cfg)
        _send(stream, _poison(_hosl_request(client, batch, 0, 0, True), how))
        with pytest.raises(HoslError, match="INVALID_ARGUMENT"):
            stream.receive(10)
        served.wait_idle()
        assert served.state.ledger.committed == 0
        after = served.state.party.part.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), how
        assert all(p.grad is None for p in served.state.party.part.parameters())
        # the server still trains, and its next losses are finite
        stream = _raw_stream(served, cfg)
        for step in range(2):
            _send(stream, _hosl_request(client, batch, step, 0, True))
            reply = from_bytes(stream.receive(10))
            assert all(math.isfinite(x) for x in [reply.loss, *reply.losses])
        assert served.state.ledger.committed == 2
        stream.close()


def test_a_step_whose_gradient_is_not_finite_is_not_committed(tokenizer, monkeypatch) -> None:
    cfg = _cfg("hosl")
    client = build_run(cfg, tiny_llama())
    (batch,) = _batches(tokenizer, 0, 1)
    with serving(cfg, bounds=BOUNDS) as served:
        party = served.state.party
        before = copy.deepcopy(party.part.state_dict())
        honest = party.hosl_step

        def overflowing(req: HoslStepRequest):  # as an overflow in backward would leave it
            reply = honest(req)
            next(p for p in party.part.parameters() if p.grad is not None).grad[0] = math.inf
            return reply

        monkeypatch.setattr(party, "hosl_step", overflowing)
        stream = _raw_stream(served, cfg)
        _send(stream, _hosl_request(client, batch, 0, 0, True))
        with pytest.raises(HoslError, match="gradient is not finite"):
            stream.receive(10)
        served.wait_idle()
        assert served.state.ledger.committed == 0 and not served.state.ledger.journal.entries
        after = party.part.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def _silent(release: threading.Event) -> Iterator[bytes]:
    release.wait(30)
    yield from ()


def test_streams_without_a_hello_time_out_and_free_the_server(tokenizer) -> None:
    cfg = _cfg("hosl")
    release = threading.Event()
    # As many silent streams as worker threads: without a hello timeout they hold every worker
    with serving(cfg, workers=2, hello_timeout=0.5) as served:
        channel = grpc.insecure_channel(served.address, options=grpc_options())
        calls = [channel.stream_stream(FULL_METHOD)(_silent(release)) for _ in range(4)]
        try:
            remote = _client(cfg, served.address, step_timeout=3)
            remote.train_step(_batches(tokenizer, 0, 1), 0)
            remote.transport.close()
            for call in calls:
                with pytest.raises(grpc.RpcError) as err:
                    list(call)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "no hello within 0.5 s" in err.value.details()
        finally:
            release.set()
            for call in calls:
                call.cancel()
            channel.close()


def test_an_idle_session_ends_and_another_client_trains(tokenizer) -> None:
    cfg = _cfg("hosl")
    with serving(cfg, idle_timeout=1.0) as served:
        idle = _raw_stream(served, cfg)  # handshakes, then says nothing
        started = time.monotonic()
        remote = _client(cfg, served.address)  # waits (ABORTED, retried) until the idle one ends
        assert time.monotonic() - started >= 0.5
        remote.train_step(_batches(tokenizer, 0, 1), 0)
        remote.transport.close()
        with pytest.raises(_Broken, match="DEADLINE_EXCEEDED: the session was idle for 1 s"):
            idle.receive(5)  # a retryable status: a real client reconnects and goes on
        assert served.state.ledger.committed == 1


def test_a_waiting_client_is_told_another_client_is_training(tokenizer, capsys) -> None:
    cfg = _cfg("hosl")
    with serving(cfg) as served:
        busy = _raw_stream(served, cfg)
        with pytest.raises(HoslError, match="busy: another client is training") as err:
            _client(cfg, served.address, reconnect_timeout=1)
        assert "TLS" not in str(err.value)
        assert "waiting up to" in capsys.readouterr().err
        busy.close()


def _hello_call(served: Served, hello: dict) -> grpc.RpcError:
    channel = grpc.insecure_channel(served.address, options=grpc_options())
    stream = _Stream(channel, [], chunk_bytes=1 << 20, frame_limit=1 << 30)
    stream.send(encode("hello", hello, {}))
    with pytest.raises(HoslError) as err:
        stream.receive(10)
    stream.close()
    channel.close()
    return err.value


@pytest.mark.parametrize(
    "run",
    [None, {"seed": 0}, {"seed": "0", "q": 2}, [1, 2]],
    ids=["no run", "partial run", "mistyped run", "list"],
)
def test_a_hello_must_name_its_run(run) -> None:
    cfg = _cfg("hosl")
    with serving(cfg) as served:
        hello = {"identity": served.state.identity.to_json(), "wire_dtype": "float32"}
        if run is not None:
            hello["run"] = run
        err = _hello_call(served, hello)
        assert "INVALID_ARGUMENT" in str(err) and "run" in str(err)
        assert not served.servicer._busy.locked()


def test_an_unhashable_wire_dtype_is_a_clean_refusal() -> None:
    cfg = _cfg("hosl")
    with serving(cfg) as served:
        hello = {"identity": served.state.identity.to_json(), "wire_dtype": ["float32"]}
        assert "wire dtype must be one of" in str(_hello_call(served, hello))


def test_a_client_of_another_seed_than_the_servers_is_refused(tokenizer) -> None:
    """The server's --seed draws its adapter's initial weights and sampled rounds' clients: a
    client with another seed is refused even as the first client (no committed step, no run
    fingerprint yet to compare with), and one with the server's seed trains."""
    cfg = _cfg("hosl")
    with serving(cfg, seed=7) as served:
        with pytest.raises(HoslError, match="server runs with seed 7, the client with seed 0"):
            _client(cfg, served.address, reconnect_timeout=0)
        assert served.state.run_fingerprint is None and not served.servicer._busy.locked()
        run = _client(dataclasses.replace(cfg, seed=7), served.address, reconnect_timeout=0)
        try:
            run.train_step(_batches(tokenizer, 0, 1), 0)
            assert served.state.ledger.committed == 1
        finally:
            run.transport.close()
