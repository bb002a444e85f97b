"""The one interface the training loops use to reach the server.

The loops never touch a `ServerParty` directly: they send messages through a `Transport`. The
in-process transport (the default) and the network transport implement the same calls, so the
same loop runs embedded or across machines. Every implementation counts the encoded bytes in each
direction and the round trips, which `summary.json` reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from hosl.transport.messages import (
    EvalReply,
    EvalRequest,
    FoStepReply,
    FoStepRequest,
    HoslStepReply,
    HoslStepRequest,
    ZoStepReply,
    ZoStepRequest,
)


@dataclass
class Traffic:
    bytes_to_server: int = 0
    bytes_to_client: int = 0
    round_trips: int = 0

    @property
    def wire_bytes(self) -> int:
        return self.bytes_to_server + self.bytes_to_client


@dataclass
class WireStats:
    """Encoded bytes and round trips, training traffic apart from evaluation traffic."""

    train: Traffic = field(default_factory=Traffic)
    eval: Traffic = field(default_factory=Traffic)

    def record(self, is_eval: bool, up: int, down: int) -> None:
        traffic = self.eval if is_eval else self.train
        traffic.bytes_to_server += up
        traffic.bytes_to_client += down
        traffic.round_trips += 1

    def dump(self) -> dict[str, Any]:
        return asdict(self)

    def load(self, saved: dict[str, Any]) -> None:
        self.train = Traffic(**saved.get("train", {}))
        self.eval = Traffic(**saved.get("eval", {}))


class ResyncNeeded(Exception):
    """The server is at a different step than the client expected (it restarted from an older
    checkpoint, or committed steps this client never saw): the client must bring its own state
    to the server's `committed` step before it goes on."""

    def __init__(self, committed: int) -> None:
        super().__init__(f"the server is at step {committed}")
        self.committed = committed


class Transport(Protocol):
    stats: WireStats

    def hosl_step(self, req: HoslStepRequest) -> HoslStepReply: ...

    def fo_step(self, req: FoStepRequest) -> FoStepReply: ...

    def zo_step(self, req: ZoStepRequest) -> ZoStepReply: ...

    def evaluate(self, req: EvalRequest) -> EvalReply: ...
