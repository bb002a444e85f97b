"""GrpcTransport against a gRPC server in this process: every mode equals in-process training,
only whole steps are applied, retries are answered from the record, TLS and tokens work."""

from __future__ import annotations

import copy
import logging
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from conftest import sentiment_examples, tiny_llama
from hosl.batching import collate
from hosl.build import Run, build_run
from hosl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.errors import HoslError
from hosl.remote import RemoteOptions, make_transport, run_fingerprint
from hosl.transport.codec import decode, encode
from hosl.transport.framing import grpc_options
from hosl.transport.grpc_client import _Stream
from hosl.transport.grpc_server import ServerState, SplitServicer
from hosl.transport.handshake import identity_for
from hosl.transport.ledger import StepLedger
from hosl.transport.messages import HoslStepRequest, from_bytes
from hosl.transport.security import TokenInterceptor, call_metadata, channel_credentials
from hosl.transport.security import server_credentials as tls_server_credentials
from hosl.transport.streaming import request_frames


def _cfg(mode: str, accum: int = 1, estimator: str = "losses") -> TrainConfig:
    return TrainConfig(
        mode=mode,
        steps=4,
        batch_size=6,
        grad_accum=accum,
        model=ModelConfig(name="tiny", split_layer=1),
        data=DataConfig(task="sst2"),
        zo=ZoConfig(q=2, eps=1e-3, lr=5e-3, estimator=estimator),
        optim=OptimConfig(optimizer="adamw", lr=0.05),
    )


@dataclass
class Served:
    address: str
    state: ServerState
    servicer: SplitServicer

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.servicer._busy.locked():
            assert time.monotonic() < deadline, "the session never ended"
            time.sleep(0.02)


@contextmanager
def serving(
    cfg: TrainConfig,
    token: str | None = None,
    tls: tuple[str, str] | None = None,
    workers: int = 4,
    **state_options: Any,
) -> Iterator[Served]:
    """The server party of an in-process run, behind a real gRPC server on 127.0.0.1;
    `state_options` go to its ServerState (timeouts, limits, model bounds)."""
    model = tiny_llama()
    party = build_run(cfg, model).server
    assert party is not None
    log = logging.getLogger("test-server")
    identity = identity_for("tiny", model.config, 1, cfg.mode, "float32", cfg.grad_accum)
    state = ServerState(party, identity, StepLedger(), hidden_size=32, log=log, **state_options)
    servicer = SplitServicer(state)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        handlers=[servicer.handler()],
        interceptors=[TokenInterceptor(token, log)] if token else [],
        options=grpc_options(server=True),
    )
    if tls is not None:
        port = server.add_secure_port("127.0.0.1:0", tls_server_credentials(*tls))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Served(f"127.0.0.1:{port}", state, servicer)
    finally:
        server.stop(0).wait()


def _batches(tokenizer, step: int, accum: int) -> list:
    examples = sentiment_examples(6 * accum, seed=step)
    return [collate(examples[6 * m : 6 * (m + 1)], tokenizer, 16) for m in range(accum)]


def _client(cfg: TrainConfig, address: str, **opts) -> Run:
    model = tiny_llama()
    opts = {"reconnect_timeout": 5, **opts}
    transport = make_transport(cfg, model, RemoteOptions(address, **opts))
    transport.connect()
    return build_run(cfg, model, transport)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "mode,accum,estimator",
    [("hosl", 1, "losses"), ("hosl", 2, "losses"), ("hosl", 2, "cut-grad"), ("fo", 2, "losses"),
     ("zo", 1, "losses"), ("frozen", 1, "losses")],
)
def test_every_mode_over_grpc_equals_in_process(tokenizer, mode, accum, estimator) -> None:
    cfg = _cfg(mode, accum, estimator)
    reference = build_run(cfg, tiny_llama())
    with serving(cfg) as served:
        remote = _client(cfg, served.address)
        for step in range(3):
            expected = reference.train_step(_batches(tokenizer, step, accum), step)
            got = remote.train_step(_batches(tokenizer, step, accum), step)
            assert got == pytest.approx(expected, abs=1e-6)
        scores = remote.scores(_batches(tokenizer, 9, 1)[0])
        torch.testing.assert_close(scores, reference.scores(_batches(tokenizer, 9, 1)[0]))
        assert remote.transport.stats.train.round_trips == 3 * accum  # one per micro-batch
        remote.transport.close()
        served.wait_idle()
        _assert_same(remote.client.part, reference.client.part)
        _assert_same(served.state.party.part, reference.server.part)
        assert served.state.ledger.committed == 3


def _raw_stream(served: Served, cfg: TrainConfig) -> _Stream:
    channel = grpc.insecure_channel(served.address, options=grpc_options())
    stream = _Stream(channel, [], chunk_bytes=1 << 20, frame_limit=1 << 30)
    hello = {
        "identity": served.state.identity.to_json(),
        "wire_dtype": "float32",
        "run": run_fingerprint(cfg),
    }
    stream.send(encode("hello", hello, {}))
    assert decode(stream.receive(10))[1] == {"committed": served.state.ledger.committed}
    return stream


def _hosl_request(run: Run, batch, step: int, micro: int, update: bool) -> HoslStepRequest:
    clean = run.client.activations(batch)
    from hosl.algos.split_modes import cut

    return HoslStepRequest(
        step, micro, update, cut(batch, clean),
        list(run.client.perturbed_deltas(batch, run.runner.seeds(step, micro), 1e-3, clean.hidden)),
        clean.hidden,
    )


def test_a_client_that_vanishes_mid_step_leaves_the_server_as_before(tokenizer) -> None:
    cfg = _cfg("hosl", accum=2)
    reference = build_run(cfg, tiny_llama())
    with serving(cfg) as served:
        before = copy.deepcopy(served.state.party.part.state_dict())
        stream = _raw_stream(served, cfg)
        micro0, micro1 = _batches(tokenizer, 0, 2)
        head, parts = request_frames(_hosl_request(reference, micro0, 0, 0, False), torch.float32)
        for frame in [head, *parts]:
            stream.send(frame)
        stream.receive(10)  # micro-batch 0 applied: gradients accumulated on the server
        assert any(p.grad is not None for p in served.state.party.part.parameters())
        head, parts = request_frames(_hosl_request(reference, micro1, 0, 1, True), torch.float32)
        stream.send(head)
        stream.send(next(parts))  # the clean activation, then the client vanishes
        stream.call.cancel()
        served.wait_idle()
        assert served.state.ledger.committed == 0 and served.state.ledger.open_step is None
        assert all(p.grad is None for p in served.state.party.part.parameters())
        after = served.state.party.part.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        # and the whole step, sent again by a real client, gives the in-process result
        remote = _client(cfg, served.address)
        expected = reference.train_step(_batches(tokenizer, 0, 2), 0)
        assert remote.train_step(_batches(tokenizer, 0, 2), 0) == pytest.approx(expected, abs=1e-6)
        remote.transport.close()
        served.wait_idle()
        _assert_same(served.state.party.part, reference.server.part)


def test_a_committed_step_sent_again_is_answered_not_applied(tokenizer) -> None:
    cfg = _cfg("hosl")
    client = build_run(cfg, tiny_llama())
    with serving(cfg) as served:
        stream = _raw_stream(served, cfg)
        (batch,) = _batches(tokenizer, 0, 1)
        req = _hosl_request(client, batch, 0, 0, True)
        replies = []
        for _ in range(2):
            head, parts = request_frames(req, torch.float32)
            for frame in [head, *parts]:
                stream.send(frame)
            replies.append(stream.receive(10))
            if len(replies) == 1:
                after_first = copy.deepcopy(served.state.party.part.state_dict())
        assert replies[0] == replies[1] and served.state.ledger.committed == 1
        assert from_bytes(replies[0]).losses == from_bytes(replies[1]).losses
        again = served.state.party.part.state_dict()
        assert all(torch.equal(after_first[k], again[k]) for k in again)
        head, parts = request_frames(_hosl_request(client, batch, 5, 0, True), torch.float32)
        for frame in [head, *parts]:
            stream.send(frame)
        with pytest.raises(HoslError, match="step 5 is ahead of the server"):
            stream.receive(10)
        served.wait_idle()
        assert served.state.ledger.committed == 1


def test_chunked_frames_give_the_same_training(tokenizer) -> None:
    cfg = _cfg("hosl")
    reference = build_run(cfg, tiny_llama())
    with serving(cfg) as served:
        remote = _client(cfg, served.address)
        remote.transport._chunk = 700  # every activation (6 x 16 x 32 floats) in many chunks
        for step in range(2):
            expected = reference.train_step(_batches(tokenizer, step, 1), step)
            assert remote.train_step(_batches(tokenizer, step, 1), step) == pytest.approx(
                expected, abs=1e-6
            )
        remote.transport.close()


def _self_signed(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert), str(key)


def test_tls_with_a_token(tokenizer, tmp_path) -> None:
    cert, key = _self_signed(tmp_path)
    cfg = _cfg("hosl")
    with serving(cfg, token="s3cret", tls=(cert, key)) as served:
        remote = _client(cfg, served.address, token="s3cret", tls_ca=cert)
        remote.train_step(_batches(tokenizer, 0, 1), 0)
        remote.transport.close()
        served.wait_idle()
        assert served.state.ledger.committed == 1
        with pytest.raises(HoslError, match="UNAUTHENTICATED"):
            _client(cfg, served.address, token="wrong", tls_ca=cert)
        with pytest.raises(HoslError, match="cannot reach"):
            _client(cfg, served.address, token="s3cret")  # plain TCP to a TLS port
    assert channel_credentials(None, False) is None and call_metadata(None) == []
