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
oversized frame, a step out of order, non-finite activations or a step whose loss or gradient is not
finite) ends that client's call with an error status and a log line; the server keeps serving. One
client trains at a time. Before its hello a stream may send one frame of at most 1 MiB, within the
hello timeout; after it, frames are bounded by what its batch size and length imply, and a session
silent for longer than the idle timeout ends, so no peer holds the server for ever.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import torch

from hosl.dtypes import DTYPES
from hosl.parties.server import ServerParty
from hosl.transport.codec import CodecError, Limits, decode, encode
from hosl.transport.framing import (
    DEFAULT_FRAME_LIMIT,
    HELLO_LIMIT,
    ByteBudget,
    Reassembler,
    to_messages,
)
from hosl.transport.guard import (
    FiniteParts,
    ModelBounds,
    check_batch,
    check_finite,
    check_gradients,
    check_reply,
)
from hosl.transport.handshake import Identity, mismatches
from hosl.transport.inbox import Inbox, InboxClosed, InboxTimeout
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
BUSY = "another client is training with this server; retry when it is done"
FRAME_SLACK = 1 << 20  # a head, a header and the JSON of a frame, beyond its activation bytes
# The run entry of a hello: (type, smallest value). The server compares it across clients and
# derives its frame limit from batch_size and max_length.
RUN_FIELDS: dict[str, tuple[type, float]] = {
    "seed": (int, -(2**63)),
    "q": (int, 1),
    "eps": (float, 0.0),
    "client_lr": (float, -math.inf),
    "batch_size": (int, 1),
    "task": (str, 0),
    "max_length": (int, 1),
}


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
    # the server's own --seed (its adapter's initial weights, sampled rounds' draws): a client
    # must train with the same one; None: not checked (a server assembled in a test)
    seed: int | None = None
    bounds: ModelBounds = field(default_factory=ModelBounds)
    hello_timeout: float = 10.0
    idle_timeout: float = 900.0
    # partial frames across all connections: one session's largest frame plus every waiting
    # stream's hello; None: twice the frame limit
    buffer_limit: int | None = None
    budget: ByteBudget = field(init=False)
    lock: threading.RLock = field(default_factory=threading.RLock)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.budget = ByteBudget(self.buffer_limit or 2 * self.frame_limit)

    @property
    def compute_dtype(self) -> torch.dtype:
        # float32 whatever the model's dtype: the party casts where it computes in bf16
        return torch.float32

    def session_frame_limit(self, run: dict[str, Any]) -> int:
        """The largest frame a client of this run can need: one (batch, length, hidden) float32
        activation plus slack, and never more than the server's --max-frame-mb."""
        length = run["max_length"]
        if self.bounds.max_positions is not None:
            length = min(length, self.bounds.max_positions)
        need = run["batch_size"] * length * self.hidden_size * 4 + FRAME_SLACK
        return min(self.frame_limit, need)


def check_run(run: Any) -> dict[str, Any]:
    """The hello's run entry, every field present and of its type; CodecError otherwise."""
    if not isinstance(run, dict):
        raise CodecError("the hello has no run entry (seed, q, eps, batch size, ...)")
    for key, (kind, low) in RUN_FIELDS.items():
        value = run.get(key)
        number = kind is float and isinstance(value, int)
        if isinstance(value, bool) or not (isinstance(value, kind) or number):
            raise CodecError(f"run field {key!r} is missing or not a {kind.__name__}")
        if kind is not str and not (low <= value < math.inf):
            raise CodecError(f"run field {key!r} is out of range: {value!r}")
    # Fields a newer client adds are compared too, if they are plain scalars and few.
    extra = {k: v for k, v in run.items() if k not in RUN_FIELDS}
    scalar = (str, int, float, bool, type(None))
    if len(extra) > 32 or not all(isinstance(v, scalar) for v in extra.values()):
        raise CodecError("the run entry has too many fields, or fields that are not scalars")
    return dict(run)


def server_memory_extra(party: Any) -> dict[str, Any]:
    """`@server_memory` for a reply: the party's measured peak and phase peaks, if it meters."""
    meter = getattr(party, "meter", None)
    if meter is None:
        return {}
    return {SERVER_MEMORY_KEY: {"peak_bytes": meter.peak_bytes, "phase_peaks": meter.phase_peaks()}}


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
        # Nothing large is accepted before the hello: a stream that has not identified itself
        # can make the server hold one small frame, for at most the hello timeout.
        inbox = Inbox(messages, Reassembler(HELLO_LIMIT, self.state.budget))
        acquired = False
        try:
            hello = self._hello(inbox)
            problem = mismatches(self.state.identity, hello["identity"])
            if problem is not None:
                raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION, f"handshake refused: {problem}")
            if hello["client"] is not None:
                raise _Refuse(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this server trains one client at a time; a client with --client-id needs "
                    "`hosl serve --max-clients N`",
                )
            self._check_seed(hello["run"])
            if not self._busy.acquire(blocking=False):
                raise _Refuse(grpc.StatusCode.ABORTED, BUSY)
            acquired = True
            self._check_run(hello["run"])
            inbox.assembler.limit = self.state.session_frame_limit(hello["run"])
            log.info("client %s connected at step %d", peer, self.state.ledger.committed)
            yield from self._serve(inbox, hello["wire_dtype"], hello["run"])
            log.info("client %s closed its session", peer)
        except _Refuse as refusal:
            log.warning("refused client %s: %s", peer, refusal)
            context.abort(refusal.code, str(refusal))
        except _Disconnected:
            log.info("client %s disconnected", peer)
        finally:
            inbox.close()
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

    def _next(self, inbox: Inbox, *, hello: bool = False) -> bytes:
        """The next frame, or a refusal naming the timeout that expired."""
        timeout = self.state.hello_timeout if hello else self._frame_timeout(inbox)
        try:
            return inbox.next(timeout)
        except InboxClosed:
            raise _Disconnected() from None
        except InboxTimeout:
            what = f"no hello within {timeout:g} s" if hello else self._timeout_message(inbox,
                                                                                         timeout)
            raise _Refuse(grpc.StatusCode.DEADLINE_EXCEEDED, what) from None
        except CodecError as err:
            raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {err}") from None

    def _frame_timeout(self, inbox: Inbox) -> float:
        """How long the session waits for its next frame (`hosl.transport.sessions`: per turn)."""
        return self.state.idle_timeout

    def _timeout_message(self, inbox: Inbox, timeout: float) -> str:
        """Why a session that sent no frame within `timeout` seconds is closed."""
        return f"the session was idle for {timeout:g} s and was closed; reconnect to go on"

    def _hello(self, inbox: Inbox) -> dict[str, Any]:
        try:
            kind, scalars, _ = decode(self._next(inbox, hello=True), Limits(HELLO_LIMIT))
            if kind != "hello":
                raise CodecError(f"expected a hello frame first, got {kind!r}")
            identity = Identity.from_json(scalars.get("identity"))
            wire = scalars.get("wire_dtype")
            if not isinstance(wire, str) or wire not in DTYPES:
                raise CodecError(f"wire dtype must be one of {', '.join(DTYPES)}, got {wire!r}")
            run = check_run(scalars.get("run"))
        except (CodecError, ValueError) as err:
            raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed hello: {err}") from None
        # "client": a many-client session's id and place in the update log (hosl.transport.sessions)
        return {"identity": identity, "wire_dtype": DTYPES[wire], "run": run,
                "client": scalars.get("client")}

    def _check_seed(self, run: dict[str, Any]) -> None:
        """A run has one seed: the server's draws its adapter's initial weights and which clients
        a sampled round takes, the client's its data order and perturbations. A client of
        another seed would train a run that no single-process `hosl train` reproduces."""
        seed = self.state.seed
        if seed is not None and run.get("seed") != seed:
            raise _Refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the server runs with seed {seed}, the client with seed {run.get('seed')!r}: "
                "a run has one seed; give `hosl serve` and `hosl client` the same --seed",
            )

    def _check_run(self, run: dict[str, Any]) -> None:
        """A server that has committed steps serves only clients of the same run: replaying its
        journal with other seeds or batches would give the client a different model."""
        state = self.state
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

    def _serve(self, inbox: Inbox, wire: torch.dtype, run: dict[str, Any]) -> Iterator[bytes]:
        yield from to_messages(encode("welcome", {"committed": self.state.ledger.committed}, {}))
        while not self.state.stopping.is_set():
            try:
                head = self._next(inbox)
            except _Disconnected:
                return  # the client ended its stream (or vanished) between steps
            reply = self._answer(head, inbox, wire, run)
            yield from to_messages(reply)
        raise _Refuse(
            grpc.StatusCode.UNAVAILABLE, "the server is shutting down; reconnect when it is back"
        )

    def _answer(self, head: bytes, inbox: Inbox, wire: torch.dtype, run: dict[str, Any],
                *, owns_step: bool = True) -> bytes:
        """The reply to one request; `owns_step`: a refused request may discard the open step
        (False for a many-client session without the turn: the open step is another's)."""
        state = self.state
        try:
            kind, scalars, _ = decode(head, Limits(max_message_bytes=inbox.assembler.limit))
            if kind == "journal":
                return self._journal(scalars)
            with state.lock:
                return self._step(head, inbox, wire, run, owns_step)
        except CodecError as err:
            raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}") from None
        except StepRefused as err:
            raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None

    def _journal(self, scalars: dict[str, Any]) -> bytes:
        start, stop = scalars.get("start"), scalars.get("stop")
        ledger = self.state.ledger
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (start, stop))
        if not ok or not 0 <= start <= stop or stop > ledger.committed:
            raise CodecError(f"journal range {start!r}..{stop!r} outside 0..{ledger.committed}")
        try:
            entries = ledger.journal.between(start, stop)
        except KeyError as err:
            raise StepRefused(f"the journal has no entry for step {err}") from None
        return encode("journal", {"entries": entries}, {})

    def _step(self, head: bytes, inbox: Inbox, wire: torch.dtype, run: dict[str, Any],
              owns_step: bool = True) -> bytes:
        state, ledger, party = self.state, self.state.ledger, self.state.party
        up = len(head)

        def next_part() -> bytes:
            nonlocal up
            frame = self._next(inbox)
            up += len(frame)
            return frame

        try:
            # Received tensors are the server's bytes, metered as the in-process transport does;
            # the perturbed parts arrive lazily, later, and are decoded in the same phase.
            receiving = partial(party.phase, "receive")
            with receiving():
                req, lazy = open_request(
                    head,
                    next_part,
                    state.compute_dtype,
                    state.hidden_size,
                    Limits(max_message_bytes=inbox.assembler.limit),
                    decoding=receiving,
                )
            _check_request(req, state.bounds, run["max_length"])
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
            if owns_step:
                self._discard()
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            # A request that decodes but does not fit the model (indices out of range, ...)
            if owns_step:
                self._discard()
            raise _Refuse(
                grpc.StatusCode.INVALID_ARGUMENT, f"request does not fit the model: {err}"
            ) from None
        encoded = to_bytes(reply, wire)
        if ledger.record(req.step, req.micro, req.update, reply, encoded, up):
            state.on_commit(ledger.committed)
        return encoded

    def _apply(self, req: Any) -> Any:
        """Run the step without its update, check that its losses and gradients are finite,
        and only then update: a step that would poison the parameters leaves them as they were."""
        party = self.state.party
        dry = dataclasses.replace(req, update=False)
        if isinstance(req, HoslStepRequest):
            reply = party.hosl_step(dry)
        elif isinstance(req, FoStepRequest):
            reply = party.fo_step(dry)
        elif isinstance(req, ZoStepRequest):
            reply = party.zo_step(dry)
        else:
            raise CodecError(f"unexpected request {type(req).__name__}")
        check_reply(reply)
        check_gradients(party.part.parameters())
        if req.update:
            _commit_update(party, req)
        return reply

    def _discard(self) -> None:
        self.state.ledger.abort()
        self.state.party.discard_partial_step()


def _check_request(req: Any, bounds: ModelBounds, max_length: int) -> None:
    """Sizes, indices and values the model accepts, before anything is applied."""
    check_batch(req.batch, bounds, max_length)
    for name in ("clean", "hidden"):
        if isinstance(getattr(req, name, None), torch.Tensor):
            check_finite(f"the {name} activation", getattr(req, name))
    perturbed = getattr(req, "perturbed", None)
    if perturbed is not None:
        req.perturbed = FiniteParts(perturbed)


def _commit_update(party: ServerParty, req: Any) -> None:
    """The update a step's last micro-batch makes, as the party makes it with update=True."""
    if isinstance(req, ZoStepRequest):
        from hosl.zo import apply_zo_update_

        records = party._zo_records  # the coefficients zo_step(update=False) accumulated
        assert records is not None
        with party.phase("update"):
            apply_zo_update_(party.zo, records.records, req.lr, req.weight_decay)
        party._zo_records = None
        return
    party.optimizer_step()
