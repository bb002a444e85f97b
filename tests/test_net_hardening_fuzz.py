"""A seeded, bounded fuzz of everything that parses bytes from a peer: the codec, the frame
reassembler, the message decoder and the streamed-request reader. Tens of thousands of inputs,
a few seconds; the only exception allowed out is the clean `CodecError`."""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from typing import Any

import torch

from hosl.batching import ScoreSpec
from hosl.protocol import CutBatch, EvalReply, HoslStepReply, HoslStepRequest
from hosl.transport.codec import MAGIC, CodecError, decode, encode
from hosl.transport.framing import Reassembler, to_messages
from hosl.transport.guard import ModelBounds, check_batch
from hosl.transport.messages import from_bytes, to_bytes
from hosl.transport.streaming import open_request, request_frames

SEED = 20240614
# A fixed count, not a time budget: a loaded machine (a CI runner, parallel test workers) then
# takes longer instead of trying fewer inputs. About 8 s on an idle 2-core CPU.
INPUTS = 10_000
HIDDEN = 8


def _request() -> HoslStepRequest:
    spec = ScoreSpec(
        positions=torch.tensor([3, 7]),
        position_index=torch.tensor([0, 1, 0, 1]),
        tokens=torch.tensor([5, 6, 5, 6]),
        candidate_index=torch.tensor([0, 1, 2, 3]),
        labels=torch.tensor([0, 1]),
        num_candidates=2,
    )
    batch = CutBatch(torch.ones(2, 4, dtype=torch.long), torch.arange(4).expand(2, 4), spec)
    return HoslStepRequest(
        3, 0, True, batch, [torch.randn(2, 4, HIDDEN) for _ in range(2)], torch.randn(2, 4, HIDDEN)
    )


def _seeds() -> list[bytes]:
    """Valid frames of every kind a peer sends: the mutations start from these."""
    req = _request()
    head, parts = request_frames(req, torch.float32)
    return [
        head,
        *parts,
        to_bytes(req),
        to_bytes(HoslStepReply(losses=[0.5, 0.25], loss=0.5)),
        to_bytes(EvalReply(scores=torch.randn(2, 2))),
        encode("hello", {"identity": {"protocol": 2}, "run": {"seed": 0}}, {}),
        encode("journal", {"entries": [{"step": 0, "micro": 0, "reply": {}}]}, {}),
    ]


_NASTY: list[Any] = [
    None,
    True,
    -1,
    0,
    1,
    2**31,
    2**63,
    -(2**63),
    2**64 + 5,
    10**40,
    1e308,
    -0.0,
    "x",
    "float32",
    "int64",
    "bool",
    [],
    {},
    [1, 2],
    {"a": 1},
    [[[[]]]],
    [2**63, 2],
    [-1],
    [1] * 9,
    "HoslStepReply",
    [2**63, 0],
    [0, 2**64],
    [2**40, 2**40, 0],
    [1.5],
    [True],
]


def _nasty(rng: random.Random) -> Any:
    if rng.random() < 0.05:  # deep nesting: json's own recursion limit
        depth = rng.choice([50, 5000, 200_000])
        return json.loads("[" * depth + "]" * depth) if depth < 1000 else ("deep", depth)
    return rng.choice(_NASTY)


def _mutate_value(value: Any, rng: random.Random) -> Any:
    """Replace one leaf (or subtree) somewhere inside `value` with a nasty one."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        out = dict(value)
        if rng.random() < 0.1:
            del out[key]
        else:
            out[key] = _mutate_value(value[key], rng)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return [*value[:i], _mutate_value(value[i], rng), *value[i + 1 :]]
    return _nasty(rng)


def _with_header(frame: bytes, header: Any) -> bytes:
    old_len = struct.unpack_from("<I", frame, 4)[0]
    payload = frame[8 + old_len :]
    if isinstance(header, tuple):  # ("deep", n): nesting json.dumps itself could not write
        text = b"[" * header[1] + b"]" * header[1]
    else:
        text = json.dumps(header, allow_nan=True).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + payload


def _mutate(frame: bytes, rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.6:
        try:
            header_len = struct.unpack_from("<I", frame, 4)[0]
            header = json.loads(frame[8 : 8 + header_len])
        except (struct.error, ValueError, RecursionError):
            choice = 0.7  # already broken: mutate its bytes instead
        else:
            metas = header.get("tensors") if isinstance(header, dict) else None
            if metas and isinstance(metas, list) and rng.random() < 0.4:
                # aim at the tensor entries: dtype, shape, offset and size checks
                meta = rng.choice(metas)
                if isinstance(meta, dict):
                    meta[rng.choice(["name", "dtype", "shape", "offset", "nbytes"])] = _nasty(rng)
                return _with_header(frame, header)
            return _with_header(frame, _mutate_value(header, rng))
    data = bytearray(frame)
    if choice < 0.8 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if choice < 0.9:
        return bytes(data[: rng.randrange(len(data) + 1)])
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))


def _parse(frame: bytes, parts: list[bytes]) -> None:
    """Every parser a peer's bytes reach, as the server and the client call them."""
    decode(frame)
    from_bytes(frame)
    feed = iter(parts)
    req, lazy = open_request(frame, lambda: next(feed), torch.float32, HIDDEN)
    check_batch(req.batch, ModelBounds(max_positions=16, vocab_size=10), max_length=8)
    if lazy is not None:
        lazy.drain()


def _feed(messages: list[bytes]) -> None:
    assembler = Reassembler(limit=1 << 16)
    for message in messages:
        assembler.feed(message)


def test_no_decoder_lets_anything_but_codec_error_escape() -> None:
    rng = random.Random(SEED)
    seeds = _seeds()
    _, good_parts = request_frames(_request(), torch.float32)
    good_parts = list(good_parts)
    escapes: Counter[str] = Counter()
    tried = 0
    while tried < INPUTS:
        frame = _mutate(rng.choice(seeds), rng)
        parts = [_mutate(p, rng) if rng.random() < 0.3 else p for p in good_parts]
        messages = list(to_messages(frame, chunk_bytes=rng.choice([7, 64, 1 << 20])))
        if rng.random() < 0.3:
            messages[rng.randrange(len(messages))] = _mutate(frame, rng)[:32]
        for check, args in ((_parse, (frame, parts)), (_feed, (messages,))):
            try:
                check(*args)
            except (CodecError, StopIteration):
                pass  # StopIteration: the fuzzed head asked for more parts than exist
            except Exception as err:  # noqa: BLE001 (counting what escapes is the point)
                escapes[f"{type(err).__name__}: {str(err)[:80]}"] += 1
        tried += 1
    assert not escapes, f"{sum(escapes.values())} of {tried} escaped: {escapes.most_common(8)}"
