"""In-process transport: the embedded default, used by tests and the demo.

Each request really is encoded to bytes and decoded on the "server side" (and each reply back),
so the byte counts are those the network would carry, the wire dtype (bf16 halves the bytes) has
exactly its networked effect on the numbers, and the server never sees a client tensor object.

Given the cut's width (`hidden_size`, as `build_run` gives it), a request with perturbed
activations travels as the network transport sends it (`hosl.transport.streaming`): a head, the
clean h, then one frame per perturbed activation, made when the server asks for it. With the
client's lazy activations (`ClientParty.lazy_pairs`) each forward pass runs then, and its output
is freed once encoded: the client holds one perturbed activation at a time, never all 2Q.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch

from hosl.parties.server import ServerParty
from hosl.parties.state import PartyState
from hosl.transport.base import WireStats
from hosl.transport.messages import (
    EvalReply,
    EvalRequest,
    FoStepReply,
    FoStepRequest,
    HoslStepReply,
    HoslStepRequest,
    ZoStepReply,
    ZoStepRequest,
    from_bytes,
    to_bytes,
)
from hosl.transport.streaming import open_request, request_frames


class _CountedFrames:
    """A streamed request's frames (`request_frames`), handed out one by one and counted."""

    def __init__(self, head: bytes, parts: Iterator[bytes]) -> None:
        self.head, self._parts, self.sent = head, parts, len(head)

    def next(self) -> bytes:
        frame = next(self._parts)  # may run one client forward pass, metered as the client's
        self.sent += len(frame)
        return frame


class LocalTransport:
    def __init__(
        self,
        server: ServerParty,
        wire_dtype: torch.dtype = torch.float32,
        client: PartyState | None = None,
        hidden_size: int | None = None,
    ) -> None:
        self.server = server
        self.client = client  # only to meter what the client decodes
        self.wire_dtype = wire_dtype
        # the cut's width: given, requests with perturbed activations are streamed (docstring)
        self.hidden_size = hidden_size
        self.stats = WireStats()

    def _call(self, handler: Callable[[Any], Any], request: Any) -> Any:
        if self.hidden_size is not None and getattr(request, "perturbed", None):
            frames = _CountedFrames(*request_frames(request, self.wire_dtype))
            receiving = partial(self.server.phase, "receive")  # each part decoded in it
            with receiving():
                decoded, _ = open_request(frames.head, frames.next, torch.float32,
                                          self.hidden_size, decoding=receiving)
            reply = handler(decoded)  # reads the perturbed activations, one frame each
            up = frames.sent
        else:
            encoded = to_bytes(request, self.wire_dtype)
            # What the server decodes is the server's memory: it is counted in its "receive"
            # phase and stays counted while the handler holds it.
            with self.server.phase("receive"):
                decoded = from_bytes(encoded)  # float32: each party casts where it computes
            reply = handler(decoded)
            up = len(encoded)
        down = to_bytes(reply, self.wire_dtype)
        self.stats.record(isinstance(request, EvalRequest), up, len(down))
        # likewise the reply (e.g. the FO client's ∂L/∂h) is the client's memory
        with self.client.phase("receive") if self.client is not None else nullcontext():
            return from_bytes(down)

    def hosl_step(self, req: HoslStepRequest) -> HoslStepReply:
        return self._call(self.server.hosl_step, req)

    def fo_step(self, req: FoStepRequest) -> FoStepReply:
        return self._call(self.server.fo_step, req)

    def zo_step(self, req: ZoStepRequest) -> ZoStepReply:
        return self._call(self.server.zo_step, req)

    def evaluate(self, req: EvalRequest) -> EvalReply:
        return self._call(self.server.evaluate, req)
