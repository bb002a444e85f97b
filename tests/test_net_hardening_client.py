"""`hosl client` against a hostile server: whatever it sends back (garbage, deep JSON, mistyped
headers, NaN or missing losses, wrong shapes, a bad journal) ends the run with one line, never a
traceback, and the client never trains on it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
import torch

from hosl.cli import main
from hosl.errors import HoslError
from hosl.protocol import EvalReply, HoslStepReply
from hosl.transport.codec import MAGIC, encode
from hosl.transport.framing import grpc_options, read_frames
from hosl.transport.grpc_server import METHOD, SERVICE
from hosl.transport.messages import to_bytes
from test_grpc_transport import _batches, _cfg, _client
from test_net_hardening_cli import _client_args


def _with_header(text: bytes) -> bytes:
    return MAGIC + len(text).to_bytes(4, "little") + text


WELCOME = encode("welcome", {"committed": 0}, {})
HOSTILE = {
    "garbage": b"\x00not a hosl frame at all",
    "deep json": b"\x00" + _with_header(b"[" * 100_000 + b"]" * 100_000),
    "unhashable dtype": b"\x00"
    + _with_header(
        b'{"kind":"HoslStepReply","scalars":{},"tensors":[{"name":"x","dtype":["f"],'
        b'"shape":[1],"offset":0,"nbytes":4}]}'
    ),
    "huge empty shape": b"\x00"
    + _with_header(
        b'{"kind":"EvalReply","scalars":{},"tensors":[{"name":"scores","dtype":"float32",'
        b'"shape":[9223372036854775808,0],"offset":0,"nbytes":0}]}'
    ),
    "unknown tag": b"\x07" + WELCOME,
    "nan losses": b"\x00" + to_bytes(HoslStepReply(losses=[math.nan] * 4, loss=0.5)),
    "too few losses": b"\x00" + to_bytes(HoslStepReply(losses=[0.5], loss=0.5)),
    "string loss": b"\x00" + encode("HoslStepReply", {"losses": [1, 2, 3, 4], "loss": "x"}, {}),
    "missing field": b"\x00" + encode("HoslStepReply", {"losses": [1.0] * 4}, {}),
    "wrong kind": b"\x00" + to_bytes(EvalReply(scores=torch.zeros(6, 2))),
}


@contextmanager
def hostile_server(reply: bytes, welcome: bytes = b"\x00" + WELCOME) -> Iterator[str]:
    """A server that welcomes any client, then answers its first request with `reply`."""

    def session(messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        frames = read_frames(messages)
        next(frames)  # the hello
        yield welcome
        next(frames)  # the first request's head
        yield reply
        for _ in frames:  # the rest of the request, until the client gives up
            pass

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(session)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        handlers=[handler],
        options=grpc_options(server=True),
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_reply_is_one_clean_error(tokenizer, name) -> None:
    cfg = _cfg("hosl")
    with hostile_server(HOSTILE[name]) as address:
        remote = _client(cfg, address, step_timeout=10)
        before = [p.clone() for p in remote.client.part.parameters()]
        with pytest.raises(HoslError) as err:
            remote.train_step(_batches(tokenizer, 0, 1), 0)
        remote.transport.close()
    assert "\n" not in str(err.value) and "server" in str(err.value)
    after = list(remote.client.part.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "trained on a hostile reply"


@pytest.mark.parametrize(
    "welcome",
    [
        encode("welcome", {"committed": -3}, {}),
        encode("welcome", {"committed": True}, {}),
        _with_header(b"[" * 100_000 + b"]" * 100_000),
    ],
    ids=["negative step", "bool step", "deep json"],
)
def test_a_hostile_welcome_is_one_clean_error(welcome) -> None:
    with hostile_server(b"", welcome=b"\x00" + welcome) as address, pytest.raises(HoslError):
        _client(_cfg("hosl"), address, step_timeout=10)


def test_hosl_client_prints_one_line_for_a_hostile_server(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    """The CLI: exit status 2 and one line on stderr (its first request is the zero-shot eval)."""
    scores = b"\x00" + to_bytes(EvalReply(scores=torch.full((8, 2), math.nan)))
    with hostile_server(scores) as address:
        code = main(
            _client_args(
                tiny_model_dir, sentiment_files, tmp_path / "c", "--server", address,
                "--batch-size", "8", "--max-length", "16", "--steps", "1",
                "--eval-examples", "8", "--no-progress", "--reconnect-timeout", "5",
            )
        )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("hosl: error")]
    assert len(lines) == 1 and "Traceback" not in err and "scores" in lines[0]
