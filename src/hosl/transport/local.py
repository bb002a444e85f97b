"""In-process transport: the embedded default, used by tests and the demo.

Each request really is encoded to bytes and decoded on the "server side" (and each reply back),
so the byte counts are those the network would carry, the wire dtype (bf16 halves the bytes) has
exactly its networked effect on the numbers, and the server never sees a client tensor object.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
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


class LocalTransport:
    def __init__(
        self,
        server: ServerParty,
        wire_dtype: torch.dtype = torch.float32,
        client: PartyState | None = None,
    ) -> None:
        self.server = server
        self.client = client  # only to meter what the client decodes
        self.wire_dtype = wire_dtype
        self.stats = WireStats()

    def _call(self, handler: Callable[[Any], Any], request: Any) -> Any:
        up = to_bytes(request, self.wire_dtype)
        # What the server decodes is the server's memory: it is counted in its "receive" phase
        # and stays counted while the handler holds it.
        with self.server.phase("receive"):
            decoded = from_bytes(up)  # float32: each party casts where it computes in bf16
        reply = handler(decoded)
        down = to_bytes(reply, self.wire_dtype)
        self.stats.record(isinstance(request, EvalRequest), len(up), len(down))
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
