"""`GrpcTransport`: the `Transport` the training loops use to reach a remote `hosl serve`.

One persistent bidirectional stream carries the whole session. A step's request goes out as a
head and one frame per activation, each put on the wire as soon as it exists (when the client
party computes its perturbed activations lazily, as soon as each forward pass ends), without
waiting for anything; the server answers once. So a step is one round trip whatever Q is.

Faults: if the stream breaks, the transport reconnects (a fresh channel, with backoff, until
`reconnect_timeout`) and asks the server where it stands. If the server is still at this step, the
step's micro-batches are sent again (the server discarded the partial step); if the server had
committed the step and only the reply was lost, the same request is answered from the server's
record without being applied twice. Any other answer means the two sides diverged (the server
restarted from an older checkpoint): `ResyncNeeded` tells the loop to bring the client to the
server's step first.
"""

from __future__ import annotations

import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import torch

from hosl.dtypes import NAMES as DTYPE_NAMES
from hosl.errors import HoslError
from hosl.transport.base import ResyncNeeded, WireStats
from hosl.transport.codec import CodecError, decode, encode
from hosl.transport.framing import (
    CHUNK_BYTES,
    DEFAULT_FRAME_LIMIT,
    grpc_options,
    read_frames,
    to_messages,
)
from hosl.transport.grpc_server import BUSY, FULL_METHOD
from hosl.transport.handshake import Identity
from hosl.transport.ledger import reply_from_entry
from hosl.transport.messages import (
    SERVER_MEMORY_KEY,
    EvalReply,
    EvalRequest,
    FoStepReply,
    FoStepRequest,
    HoslStepReply,
    HoslStepRequest,
    ZoStepReply,
    ZoStepRequest,
    message_from_parts,
)
from hosl.transport.security import call_metadata
from hosl.transport.streaming import request_frames

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,  # server down, restarting, or shutting down
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,  # another client's session has not ended yet
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
log = logging.getLogger(__name__)
# Anything a decoder might raise on bytes from a hostile or broken server: it ends the run with one
# line, never a traceback.
_DECODE_ERRORS = (CodecError, ValueError, TypeError, KeyError, IndexError, RuntimeError)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Broken(Exception):
    """The stream failed in a way a reconnect may cure."""

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy  # the server is serving another client


class _Stream:
    """One gRPC call: frames out through a queue, frames in through a reader thread."""

    def __init__(
        self, channel: grpc.Channel, metadata: list, chunk_bytes: int, frame_limit: int
    ) -> None:
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self._in: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._chunk = chunk_bytes
        self._limit = frame_limit
        self.call = channel.stream_stream(FULL_METHOD)(self._requests(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Any:
        while (message := self._out.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for frame in read_frames(self.call, self._limit):
                self._in.put(("frame", frame))
            self._in.put(("end", None))
        except grpc.RpcError as err:
            self._in.put(("error", err))
        except Exception as err:  # a reader thread must never die silently: say what broke
            self._in.put(("bad", err))

    def send(self, frame: bytes) -> None:
        for message in to_messages(frame, self._chunk):
            self._out.put(message)

    def receive(self, timeout: float) -> bytes:
        try:
            what, value = self._in.get(timeout=timeout)
        except queue.Empty:
            raise _Broken(f"no answer from the server within {timeout:.0f} s") from None
        if what == "frame":
            return value
        if what == "end":
            raise _Broken("the server closed the session")
        if what == "bad":
            raise HoslError(f"the server sent a malformed frame: {value}")
        code, details = value.code(), value.details()
        if code in _RETRYABLE:
            busy = code == grpc.StatusCode.ABORTED and details == BUSY
            raise _Broken(f"{code.name}: {details}", busy=busy)
        raise HoslError(f"the server refused the session ({code.name}): {details}")

    def close(self, timeout: float = 5.0) -> None:
        self._out.put(None)  # half-close: the server ends the session cleanly
        self._reader.join(timeout)
        self.call.cancel()


class GrpcTransport:
    def __init__(
        self,
        address: str,
        identity: Identity,
        *,
        wire_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype = torch.float32,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        run_fingerprint: dict[str, Any] | None = None,
        reconnect_timeout: float = 120.0,
        step_timeout: float = 3600.0,
        chunk_bytes: int = CHUNK_BYTES,
        frame_limit: int = DEFAULT_FRAME_LIMIT,
        notify: Callable[[str], None] = _stderr,
        client: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.identity = identity
        self.wire_dtype = wire_dtype
        self.compute_dtype = compute_dtype
        self.stats = WireStats()
        self.committed = 0  # the server's committed steps as far as this client knows
        self._metadata = call_metadata(token)
        self._credentials = credentials
        self._run = run_fingerprint
        self._reconnect_timeout = reconnect_timeout
        self._step_timeout = step_timeout
        self._chunk = chunk_bytes
        self._limit = frame_limit
        self._notify = notify  # tells the user the client is waiting for the server, and how long
        self._channel: grpc.Channel | None = None
        self._stream: _Stream | None = None
        self._step_id: int | None = None
        self._step_requests: list[Any] = []  # this step's earlier micro-batches, for a resend
        # {"peak_bytes", "phase_peaks"} of the server process, from its latest evaluation reply
        self.server_memory: dict[str, Any] | None = None
        # many clients (hosl.transport.sessions): {"id", "cursor", "digest", "examples",
        # "theta_bytes"} sent with the hello; such a session is not resumed by reconnecting
        # (see `_call`)
        self.client = client

    # Session -----------------------------------------------------------------------------

    def connect(self) -> int:
        """Open the session (waiting up to `reconnect_timeout` for the server to come up) and
        return the server's committed step."""
        self.committed = self._reconnect(time.monotonic() + self._reconnect_timeout)
        return self.committed

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _open_once(self) -> int:
        self.close()
        options = grpc_options()
        self._channel = (
            grpc.secure_channel(self.address, self._credentials, options=options)
            if self._credentials is not None
            else grpc.insecure_channel(self.address, options=options)
        )
        stream = _Stream(self._channel, self._metadata, self._chunk, self._limit)
        hello = {
            "identity": self.identity.to_json(),
            "wire_dtype": DTYPE_NAMES[self.wire_dtype],
            "run": self._run,
        }
        if self.client is not None:
            hello["client"] = self.client
        stream.send(encode("hello", hello, {}))
        try:
            kind, scalars, _ = decode(stream.receive(min(30.0, self._step_timeout)))
        except _DECODE_ERRORS as err:
            raise HoslError(f"{self.address} sent a malformed welcome: {err}") from None
        committed = scalars.get("committed")
        if kind != "welcome" or not _is_count(committed):
            raise HoslError(f"the server at {self.address} did not welcome the session")
        self._stream = stream
        return committed

    def _reconnect(self, deadline: float) -> int:
        delay, told = 0.1, False
        while True:
            try:
                return self._open_once()
            except _Broken as err:
                if time.monotonic() + delay > deadline:
                    raise HoslError(self._unreachable(err)) from None
                if not told:
                    left = max(0.0, deadline - time.monotonic())
                    self._notify(
                        f"hosl: waiting up to {left:.0f} s for the server at {self.address} "
                        f"({err}); --reconnect-timeout sets how long"
                    )
                    told = True
                log.info("server at %s not reachable (%s); retrying", self.address, err)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _unreachable(self, err: _Broken) -> str:
        waited = f"after {self._reconnect_timeout:g} s (--reconnect-timeout)"
        if err.busy:
            return (
                f"the hosl server at {self.address} is busy: another client is training with it; "
                f"gave up {waited}"
            )
        return (
            f"cannot reach the hosl server at {self.address} {waited} ({err}); is `hosl serve` "
            "running there, and are the address and TLS settings right?"
        )

    def journal(self, start: int, stop: int) -> list[dict[str, Any]]:
        """The committed replies of steps start..stop-1, for replaying the client's updates."""
        assert self._stream is not None, "connect() first"
        self._stream.send(encode("journal", {"start": start, "stop": stop}, {}))
        try:
            kind, scalars, _ = decode(self._stream.receive(self._step_timeout))
        except CodecError as err:
            raise HoslError(f"the server sent a malformed journal: {err}") from None
        entries = scalars.get("entries")
        if kind != "journal" or not isinstance(entries, list):
            raise HoslError("the server answered a journal request with something else")
        for entry in entries:
            _check_entry(entry, start, stop)
        return entries

    def _ask(self, kind: str, scalars: dict[str, Any], tensors: dict[str, Any],
             reply_kind: str, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """One small request and its reply on the session (many clients' turns and commits)."""
        assert self._stream is not None, "connect() first"
        try:
            self._stream.send(encode(kind, scalars, tensors))
            kind_back, back, back_tensors = decode(self._stream.receive(timeout))
        except _Broken as err:
            raise HoslError(self._lost(err)) from None
        except _DECODE_ERRORS as err:
            raise HoslError(f"the server sent a malformed {reply_kind}: {err}") from None
        if kind_back != reply_kind:
            raise HoslError(f"the server answered a {kind} with a {kind_back}")
        return back, back_tensors

    def _lost(self, err: Exception) -> str:
        return (f"lost the session with {self.address} ({err}); start the client again with "
                "--resume RUN_DIR to rejoin: it catches up from the server's update log")

    def turn(self, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """Wait (up to `timeout` s) for this client's turn: the turn's scalars and tensors."""
        return self._ask("turn", {}, {}, "turn", timeout)

    def commit(self, record: bytes | None) -> tuple[int, Any]:
        """Upload this turn's update record (None: the step changed no client parameter);
        returns the log's length and its chain digest (hex, as the server sent it)."""
        tensors = {}
        if record is not None:
            tensors["record"] = torch.frombuffer(bytearray(record), dtype=torch.uint8)
        scalars, _ = self._ask("commit", {}, tensors, "committed", self._step_timeout)
        length = scalars.get("log")
        if not _is_count(length):
            raise HoslError("the server did not confirm the update record")
        return length, scalars.get("digest")

    # Transport ---------------------------------------------------------------------------

    def _exchange(self, req: Any) -> tuple[bytes, int]:
        """Send one request pipelined (head, then each part as it is produced); one reply."""
        assert self._stream is not None, "connect() first"
        head, parts = request_frames(req, self.wire_dtype)
        self._stream.send(head)
        up = len(head)
        for frame in parts:
            self._stream.send(frame)
            up += len(frame)
        return self._stream.receive(self._step_timeout), up

    def _call(self, req: Any, reply_type: type) -> Any:
        is_eval = isinstance(req, EvalRequest)
        if not is_eval and req.step != self._step_id:
            self._step_id, self._step_requests = req.step, []
        deadline: float | None = None  # set at the first failure: a slow step costs no retry time
        resend = False
        while True:
            try:
                if self._stream is None:
                    raise _Broken("not connected")
                if resend:  # the server discarded this step's earlier micro-batches
                    for earlier in self._step_requests:
                        self._exchange(earlier)
                down, up = self._exchange(req)
                break
            except _Broken as err:
                if self.client is not None:  # a turn cannot be resumed: the client rejoins
                    raise HoslError(self._lost(err)) from None
                log.warning("lost the server (%s); reconnecting", err)
                if deadline is None:
                    deadline = time.monotonic() + self._reconnect_timeout
                resend = self._after_reconnect(req, self._reconnect(deadline), is_eval)
        try:
            kind, scalars, tensors = decode(down)
            reply = message_from_parts(kind, scalars, tensors, self.compute_dtype)
        except _DECODE_ERRORS as err:
            raise HoslError(f"the server sent a malformed reply: {err}") from None
        if not isinstance(reply, reply_type):
            raise HoslError(
                f"the server answered with a {type(reply).__name__}, not a {reply_type.__name__}"
            )
        problem = reply_problem(req, reply)
        if problem:
            raise HoslError(f"the server sent an unusable {kind}: {problem}")
        memory = scalars.get(SERVER_MEMORY_KEY)
        if _is_memory(memory):
            self.server_memory = memory
        self.stats.record(is_eval, up, len(down))
        if not is_eval:
            self._step_requests.append(req)
            if req.update:
                self.committed = req.step + 1
        return reply

    def _after_reconnect(self, req: Any, committed: int, is_eval: bool) -> bool:
        """After a reconnect: may `req` be sent again, and must the step's earlier micro-batches
        go first? Raises ResyncNeeded when the server is not where this client is."""
        if is_eval:
            if committed != self.committed:
                raise ResyncNeeded(committed)
            return False
        if req.update and committed == req.step + 1:
            return False  # committed, reply lost: the server answers from its record
        if committed != req.step:
            raise ResyncNeeded(committed)
        return bool(self._step_requests)

    def hosl_step(self, req: HoslStepRequest) -> HoslStepReply:
        return self._call(req, HoslStepReply)

    def fo_step(self, req: FoStepRequest) -> FoStepReply:
        return self._call(req, FoStepReply)

    def zo_step(self, req: ZoStepRequest) -> ZoStepReply:
        return self._call(req, ZoStepReply)

    def evaluate(self, req: EvalRequest) -> EvalReply:
        return self._call(req, EvalReply)


# Checks of what a server sends back: a hostile or broken server must not crash the client or make
# it train on values it cannot have computed.


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite_numbers(values: Any, count: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        and all(math.isfinite(v) for v in values)
    )


def _is_memory(value: Any) -> bool:
    if not isinstance(value, dict) or not _is_count(value.get("peak_bytes")):
        return False
    phases = value.get("phase_peaks")
    return isinstance(phases, dict) and all(_is_count(v) for v in phases.values())


def reply_problem(req: Any, reply: Any) -> str:
    """What is wrong with a decoded reply to `req` ("" if nothing): sizes that do not match the
    request, and values that are not finite numbers."""
    losses = getattr(reply, "losses", None)
    if losses is not None and not _finite_numbers(losses, len(req.perturbed)):
        return f"expected {len(req.perturbed)} finite losses"
    if isinstance(reply, ZoStepReply) and not _finite_numbers(reply.grads, len(req.seeds)):
        return f"expected {len(req.seeds)} finite projected gradients"
    if isinstance(reply, (HoslStepReply, FoStepReply)) and not _finite_numbers([reply.loss], 1):
        return "the loss is not a finite number"
    if isinstance(reply, FoStepReply):
        grad = reply.grad
        if grad.shape != req.hidden.shape or not bool(torch.isfinite(grad).all()):
            return f"the gradient must be finite and of shape {tuple(req.hidden.shape)}"
    if isinstance(reply, EvalReply):
        spec = req.batch.spec
        shape = (spec.num_examples, spec.num_candidates)
        if tuple(reply.scores.shape) != shape or torch.isnan(reply.scores).any():
            return f"the scores must be {shape} numbers"
    return ""


def _check_entry(entry: Any, start: int, stop: int) -> None:
    """A journal entry the client can replay: its step in range and a reply it can rebuild."""
    ok = (
        isinstance(entry, dict)
        and _is_count(entry.get("step"))
        and start <= entry["step"] < stop
        and _is_count(entry.get("micro"))
        and _is_count(entry.get("up"))
        and _is_count(entry.get("down"))
        and isinstance(entry.get("reply"), dict)
    )
    if ok:
        try:
            reply = reply_from_entry(entry)
            grads = getattr(reply, "grads", [])
            ok = _finite_numbers(reply.losses, len(reply.losses))
            ok = ok and _finite_numbers(grads, len(grads))
        except _DECODE_ERRORS:
            ok = False
    if not ok:
        raise HoslError(f"the server sent a journal entry the client cannot replay: {entry!r:.200}")
