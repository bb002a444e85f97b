"""The wire format: tensors, streamed requests, chunked frames and the handshake; no network."""

from __future__ import annotations

import struct

import pytest
import torch

from conftest import tiny_llama
from hosl.batching import ScoreSpec
from hosl.transport.codec import CodecError, Limits, decode, encode
from hosl.transport.framing import Reassembler, read_frames, to_messages
from hosl.transport.handshake import (
    PROTOCOL_VERSION,
    Identity,
    config_hash,
    identity_for,
    mismatches,
    model_name,
)
from hosl.transport.messages import CutBatch, HoslStepRequest, ZoStepRequest, from_bytes, to_bytes
from hosl.transport.streaming import open_request, request_frames

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _shapes() -> list[torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 7 - 1
    return [
        torch.tensor(3.25),  # 0-d
        torch.empty(0),  # empty
        torch.empty(2, 0, 3),  # empty with other dims
        base,
        base.transpose(0, 2),  # non-contiguous
        base[:, ::2, 1:],  # strided slice
        base.expand(3, 2, 3, 4),  # stride-0 broadcast
    ]


@pytest.mark.parametrize("dtype", FLOATS + [torch.int64, torch.bool])
@pytest.mark.parametrize("index", range(7))
def test_tensor_round_trip_every_dtype_and_shape_edge(dtype, index) -> None:
    t = _shapes()[index].to(dtype)
    kind, scalars, tensors = decode(encode("x", {"a": [1, "b"]}, {"t": t}))
    assert kind == "x" and scalars == {"a": [1, "b"]}
    got = tensors["t"]
    assert got.dtype == dtype and got.shape == t.shape
    assert torch.equal(got, t.contiguous())


def _header(meta: dict) -> bytes:
    import json

    header = json.dumps({"kind": "x", "scalars": {}, "tensors": [meta]}).encode()
    return struct.pack("<4sI", b"HOSL", len(header)) + header


def test_sizes_are_checked_before_allocation() -> None:
    # a header that claims a 4 TB tensor with a 16-byte payload is refused, not allocated
    huge = {"name": "t", "dtype": "float32", "shape": [1 << 20, 1 << 20], "offset": 0,
            "nbytes": 1 << 42}
    with pytest.raises(CodecError, match="do not fit"):
        decode(_header(huge) + b"\0" * 16)
    lying = {"name": "t", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 8}
    with pytest.raises(CodecError):
        decode(_header(lying) + b"\0" * 16)
    with pytest.raises(CodecError, match="exceeds"):
        decode(encode("x", {}, {"t": torch.zeros(100)}), Limits(max_message_bytes=200))
    for garbage in (b"", b"HOSL", b"NOPE\0\0\0\0{}", b"HOSL\xff\xff\xff\x7f{}"):
        with pytest.raises(CodecError):
            decode(garbage)


def _spec(b: int) -> ScoreSpec:
    return ScoreSpec(
        positions=torch.arange(b) * 5 + 4,
        position_index=torch.arange(b).repeat_interleave(2),
        tokens=torch.arange(2 * b) % 7,
        candidate_index=torch.arange(2 * b),
        labels=torch.arange(b) % 2,
        num_candidates=2,
    )


def _request(q: int = 2) -> HoslStepRequest:
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(3, 5, 8, generator=gen) for _ in range(2 * q + 1)]
    mask = torch.ones(3, 5, dtype=torch.long)
    return HoslStepRequest(
        step=7,
        micro=0,
        update=True,
        batch=CutBatch(mask, mask.cumsum(-1) - 1, _spec(3)),
        perturbed=hidden[:-1],
        clean=hidden[-1],
    )


@pytest.mark.parametrize("wire", FLOATS)
def test_streamed_request_equals_the_whole_message(wire) -> None:
    req = _request()
    head, parts = request_frames(req, wire)
    frames = iter(list(parts))
    got, lazy = open_request(head, lambda: next(frames), torch.float32, hidden_size=8)
    whole = from_bytes(to_bytes(req, wire))
    assert lazy is not None and not lazy.complete  # nothing perturbed received yet
    assert torch.equal(got.clean, whole.clean)
    assert [torch.equal(a, b) for a, b in zip(got.perturbed, whole.perturbed)] == [True] * 4
    assert lazy.complete and (got.step, got.micro, got.update) == (7, 0, True)
    assert torch.equal(got.batch.spec.tokens, req.batch.spec.tokens)


def test_bf16_wire_halves_the_differences_and_keeps_the_clean_base() -> None:
    req = _request(q=4)
    f32 = len(to_bytes(req, torch.float32))
    bf16 = len(to_bytes(req, torch.bfloat16))
    differences = sum(h.numel() * 4 for h in req.perturbed)
    # half the differences' bytes, give or take the header's dtype names and offsets; the clean h
    # (the base the differences are added to) keeps its four bytes an element
    assert f32 - bf16 == pytest.approx(differences / 2, abs=2 * (len(req.perturbed) + 1))
    decoded = from_bytes(to_bytes(req, torch.bfloat16))
    assert torch.equal(decoded.clean, req.clean)
    assert all(torch.equal(got, sent.to(torch.bfloat16).float())
               for got, sent in zip(decoded.perturbed, req.perturbed))


@pytest.mark.parametrize("streamed", [False, True])
def test_a_zo_zo_request_keeps_each_pairs_base_at_float32(streamed) -> None:
    """ZO-ZO sends h⁺ and h⁻ − h⁺ per pair: h⁺ is the base, kept; the difference is rounded."""
    req = _request(q=2)
    zo = ZoStepRequest(0, 0, True, 1e-3, 0.0, 1e-3, [1, 2], req.batch, req.perturbed)
    if streamed:
        head, parts = request_frames(zo, torch.bfloat16)
        frames = iter(list(parts))
        got, _ = open_request(head, lambda: next(frames), torch.float32, hidden_size=8)
    else:
        got = from_bytes(to_bytes(zo, torch.bfloat16))
    rounded = [h.to(torch.bfloat16).float() for h in zo.perturbed]
    expected = [zo.perturbed[0], rounded[1], zo.perturbed[2], rounded[3]]
    assert all(torch.equal(a, b) for a, b in zip(got.perturbed, expected, strict=True))
    assert not torch.equal(rounded[0], zo.perturbed[0])  # bf16 would have changed the base


def test_a_part_of_the_wrong_shape_or_order_is_refused() -> None:
    req = _request()
    head, parts = request_frames(req, torch.float32)
    frames = list(parts)
    with pytest.raises(CodecError, match="expected floating point"):
        open_request(head, iter(frames).__next__, torch.float32, hidden_size=9)
    swapped = iter([frames[1], frames[0], *frames[2:]])
    with pytest.raises(CodecError, match="expected part 0"):
        open_request(head, swapped.__next__, torch.float32, hidden_size=8)
    zo = ZoStepRequest(0, 0, True, 1e-3, 0.0, 1e-3, [1], req.batch, [])
    for count in (9999, -1):  # more parts than any request may have; a negative count
        claimed = to_bytes(zo, torch.float32, {"@parts": count})
        with pytest.raises(CodecError, match="part count|parts exceed"):
            open_request(claimed, iter([]).__next__, torch.float32, hidden_size=8)


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5000])
def test_chunking_round_trips_at_every_boundary(size) -> None:
    frame = bytes(range(256)) * (size // 256) + bytes(size % 256)
    messages = list(to_messages(frame, chunk_bytes=1000))
    assert len(messages) == max(1, -(-size // 1000))
    assert all(len(m) <= 1001 for m in messages)
    assert list(read_frames(iter(messages + messages))) == [frame, frame]


def test_reassembly_refuses_oversized_and_truncated_frames() -> None:
    messages = list(to_messages(b"x" * 5000, chunk_bytes=1000))
    small = Reassembler(limit=3000)
    with pytest.raises(CodecError, match="exceeds"):
        for m in messages:
            small.feed(m)
    with pytest.raises(CodecError, match="ended inside"):
        list(read_frames(iter(messages[:-1])))
    for bad in (b"", b"\x07abc"):
        with pytest.raises(CodecError):
            Reassembler().feed(bad)
    with pytest.raises(CodecError, match="middle"):
        list(read_frames(iter([messages[0], b"\x00whole"])))


def test_handshake_names_every_difference_with_both_values() -> None:
    config = tiny_llama().config
    server = identity_for("/srv/models/tiny-llama/", config, 2, "hosl", "float32", 1)
    assert mismatches(server, identity_for("tiny-llama", config, 2, "hosl", "float32", 1)) is None
    client = identity_for("tiny-llama", config, 1, "fo", "bfloat16", 1)
    problem = mismatches(server, client)
    assert problem is not None
    assert "split layer differs: server 2, client 1" in problem
    assert "mode differs: server hosl, client fo" in problem
    assert "dtype differs: server float32, client bfloat16" in problem
    other = tiny_llama(layers=4).config
    assert "model config hash differs" in mismatches(
        server, identity_for("tiny-llama", other, 2, "hosl", "float32", 1)
    )
    old = Identity(**{**server.to_json(), "protocol": 0})
    assert f"protocol version differs: server {PROTOCOL_VERSION}, client 0" in mismatches(
        server, old
    )


def test_config_hash_ignores_location_and_dtype_only() -> None:
    a, b = tiny_llama().config, tiny_llama().config
    b._name_or_path = "/elsewhere"
    b.torch_dtype = torch.bfloat16
    assert config_hash(a) == config_hash(b)
    b.hidden_size = 64
    assert config_hash(a) != config_hash(b)
    assert model_name("/a/b/smol/") == "smol" and model_name("smollm2-135m") == "smollm2-135m"


@pytest.mark.parametrize(
    "values", [None, {}, {"protocol": "1"}, {**identity_for(
        "m", tiny_llama().config, 1, "hosl", "float32", 1).to_json(), "split_layer": True}]
)
def test_a_malformed_identity_is_refused(values) -> None:
    with pytest.raises(ValueError):
        Identity.from_json(values)
