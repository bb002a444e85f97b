"""The server side of the network transport: one bidirectional gRPC stream per client session.

Service `hosl.Split`, method `Session`, raw bytes in both directions (no generated code). On the
stream:

    client: hello                              server: welcome {committed step}  or an error status
    client: head, part, part, ... (one step)   server: one reply            (one round trip a step)
    client: journal {start, stop}              server: the committed replies of those steps

The server answers each step with the unchanged `ServerParty`; only the request's list of
perturbed activations is lazy (see `streaming`), so the party evaluates h⁺₁ while h⁻₁ is still on
its way. Only a complete step is ever applied: a client that vanishes mid-step leaves the party
exactly as before that step. Every problem with one client (bad token, bad handshake, malformed or
oversized frame, a step out of order) ends that client's call with an error status and a log line;
the server keeps serving. One client trains at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from hosl.dtypes import DTYPES
from hosl.parties.server import ServerParty
from hosl.transport.codec import CodecError, Limits, decode, encode
from hosl.transport.framing import DEFAULT_FRAME_LIMIT, read_frames, to_messages
from hosl.transport.handshake import Identity, mismatches
from hosl.transport.ledger import StepLedger, StepRefused
from hosl.transport.messages import (
    SERVER_MEMORY_KEY,
    EvalRequest,
    FoStepRequest,
    HoslStepRequest,
    ZoStepRequest,
    to_bytes,
)
from hosl.transport.streaming import open_request

SERVICE = "hosl.Split"
METHOD = "Session"
FULL_METHOD = f"/{SERVICE}/{METHOD}"


class _Refuse(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Disconnected(Exception):
    """The client's stream ended or was cancelled."""


@dataclass
class ServerState:
    """Everything the sessions share. `lock` guards the party and the ledger; whoever holds it
    (a session applying a step, or the process checkpointing on SIGTERM) sees a whole step."""

    party: ServerParty
    identity: Identity
    ledger: StepLedger
    hidden_size: int
    log: logging.Logger
    on_commit: Callable[[int], None] = lambda committed: None
    on_session_end: Callable[[], None] = lambda: None
    frame_limit: int = DEFAULT_FRAME_LIMIT
    run_fingerprint: dict[str, Any] | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def compute_dtype(self) -> torch.dtype:
        # float32 whatever the model's dtype: the party casts where it computes in bf16
        return torch.float32


def server_memory_extra(party: Any) -> dict[str, Any]:
    """`@server_memory` for a reply: the party's measured peak and phase peaks, if it meters."""
    meter = getattr(party, "meter", None)
    if meter is None:
        return {}
    return {SERVER_MEMORY_KEY: {"peak_bytes": meter.peak_bytes,
                                "phase_peaks": meter.phase_peaks()}}


class SplitServicer:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._busy = threading.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(self.session)
        return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})

    # One session ---------------------------------------------------------------------------

    def session(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = context.peer()
        log = self.state.log
        frames = read_frames(messages, self.state.frame_limit)
        acquired = False
        try:
            hello = self._hello(frames)
            problem = mismatches(self.state.identity, hello["identity"])
            if problem is not None:
                raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION, f"handshake refused: {problem}")
            if not self._busy.acquire(blocking=False):
                raise _Refuse(
                    grpc.StatusCode.ABORTED,
                    "another client is training with this server; retry when it is done",
                )
            acquired = True
            self._check_run(hello.get("run"))
            log.info("client %s connected at step %d", peer, self.state.ledger.committed)
            yield from self._serve(frames, hello["wire_dtype"])
            log.info("client %s closed its session", peer)
        except _Refuse as refusal:
            log.warning("refused client %s: %s", peer, refusal)
            context.abort(refusal.code, str(refusal))
        except _Disconnected:
            log.info("client %s disconnected", peer)
        finally:
            if acquired:
                self._end_session(peer)

    def _end_session(self, peer: str) -> None:
        with self.state.lock:
            ledger = self.state.ledger
            if ledger.open_step is not None:
                self.state.log.warning(
                    "client %s left during step %d; its partial step was discarded",
                    peer,
                    ledger.open_step,
                )
            ledger.abort()
            self.state.party.discard_partial_step()
            self._busy.release()
            self.state.on_session_end()

    def _next(self, frames: Iterator[bytes]) -> bytes:
        try:
            return next(frames)
        except StopIteration:
            raise _Disconnected() from None
        except grpc.RpcError:
            raise _Disconnected() from None
        except CodecError as err:
            raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {err}") from None

    def _hello(self, frames: Iterator[bytes]) -> dict[str, Any]:
        try:
            kind, scalars, _ = decode(self._next(frames), Limits(max_message_bytes=1 << 20))
            if kind != "hello":
                raise CodecError(f"expected a hello frame first, got {kind!r}")
            identity = Identity.from_json(scalars.get("identity"))
            wire = scalars.get("wire_dtype")
            if wire not in DTYPES:
                raise CodecError(f"wire dtype must be one of {', '.join(DTYPES)}, got {wire!r}")
        except (CodecError, ValueError) as err:
            raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed hello: {err}") from None
        return {"identity": identity, "wire_dtype": DTYPES[wire], "run": scalars.get("run")}

    def _check_run(self, run: Any) -> None:
        """A server that has committed steps serves only clients of the same run: replaying its
        journal with other seeds or batches would give the client a different model."""
        state = self.state
        if not isinstance(run, dict):
            return
        with state.lock:
            known = state.run_fingerprint
            if known is None or state.ledger.committed == 0:
                state.run_fingerprint = run
                return
        diffs = [
            f"{key}: server run {known.get(key)!r}, client {run.get(key)!r}"
            for key in sorted(set(known) | set(run))
            if known.get(key) != run.get(key)
        ]
        if diffs:
            raise _Refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the server has committed {state.ledger.committed} steps of another run ("
                + "; ".join(diffs)
                + "); use the same settings, or start the server with a new --output",
            )

    def _serve(self, frames: Iterator[bytes], wire: torch.dtype) -> Iterator[bytes]:
        yield from to_messages(encode("welcome", {"committed": self.state.ledger.committed}, {}))
        while not self.state.stopping.is_set():
            try:
                head = next(frames)
            except StopIteration:
                return
            except grpc.RpcError:
                raise _Disconnected() from None
            except CodecError as err:
                raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {err}") from None
            reply = self._answer(head, frames, wire)
            yield from to_messages(reply)
        raise _Refuse(
            grpc.StatusCode.UNAVAILABLE, "the server is shutting down; reconnect when it is back"
        )

    def _answer(self, head: bytes, frames: Iterator[bytes], wire: torch.dtype) -> bytes:
        state = self.state
        try:
            kind, scalars, _ = decode(head, Limits(max_message_bytes=state.frame_limit))
            if kind == "journal":
                return self._journal(scalars)
            with state.lock:
                return self._step(head, frames, wire)
        except CodecError as err:
            raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}") from None
        except StepRefused as err:
            raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None

    def _journal(self, scalars: dict[str, Any]) -> bytes:
        start, stop = scalars.get("start"), scalars.get("stop")
        ledger = self.state.ledger
        ok = isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop
        if not ok or stop > ledger.committed:
            raise CodecError(f"journal range {start!r}..{stop!r} outside 0..{ledger.committed}")
        try:
            entries = ledger.journal.between(start, stop)
        except KeyError as err:
            raise StepRefused(f"the journal has no entry for step {err}") from None
        return encode("journal", {"entries": entries}, {})

    def _step(self, head: bytes, frames: Iterator[bytes], wire: torch.dtype) -> bytes:
        state, ledger, party = self.state, self.state.ledger, self.state.party
        up = len(head)

        def next_part() -> bytes:
            nonlocal up
            frame = self._next(frames)
            up += len(frame)
            return frame

        try:
            # Received tensors are the server's bytes, metered as the in-process transport does.
            with party.phase("receive"):
                req, lazy = open_request(
                    head,
                    next_part,
                    state.compute_dtype,
                    state.hidden_size,
                    Limits(max_message_bytes=state.frame_limit),
                )
            if isinstance(req, EvalRequest):
                # The server's own memory rides along: a networked client's summary has no other
                # way to learn it (the server process meters its first steps; see serve.py).
                return to_bytes(party.evaluate(req), wire, extra=server_memory_extra(party))
            if ledger.is_retry(req.step, req.micro):
                if lazy is not None:
                    lazy.drain()  # the parts were sent pipelined; read them off the stream
                cached, reply = ledger.retry_reply(req.step, req.micro)
                state.log.info("answered a retry of step %d from the record", req.step)
                return cached if cached is not None else to_bytes(reply, wire)
            reply = self._apply(req)
            if lazy is not None and not lazy.complete:
                raise CodecError("the step carried more parts than it used")
        except (_Refuse, _Disconnected, CodecError, StepRefused):
            self._discard()
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            # A request that decodes but does not fit the model (indices out of range, ...)
            self._discard()
            raise _Refuse(
                grpc.StatusCode.INVALID_ARGUMENT, f"request does not fit the model: {err}"
            ) from None
        encoded = to_bytes(reply, wire)
        if ledger.record(req.step, req.micro, req.update, reply, encoded, up):
            state.on_commit(ledger.committed)
        return encoded

    def _apply(self, req: Any) -> Any:
        party = self.state.party
        if isinstance(req, HoslStepRequest):
            return party.hosl_step(req)
        if isinstance(req, FoStepRequest):
            return party.fo_step(req)
        if isinstance(req, ZoStepRequest):
            return party.zo_step(req)
        raise CodecError(f"unexpected request {type(req).__name__}")

    def _discard(self) -> None:
        self.state.ledger.abort()
        self.state.party.discard_partial_step()
