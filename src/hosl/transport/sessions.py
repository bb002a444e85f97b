"""Many `hosl client` processes training one split model with one `hosl serve`.

Every client holds the same client part θ_c; no parameter crosses the wire. The server keeps the
ordered log of every applied client update (`hosl.federated.records`) and hands out turns
(the sequential schedule, round-robin over the connected clients). One turn, on a client's stream:

    client: turn {}                      server (when it is this client's turn):
                                             turn {step, local_step, records it lacks}
    client: replays the records, then sends the step (head + parts, as a one-client session)
                                         server: the step's reply (θ_s steps, as ever)
    client: commit {its update record}   server: committed {log length}; the turn passes on

When the server has committed all its steps, a turn request is answered `done` with the last
records, so every client ends holding the whole log: bit-identical θ_c everywhere.

What the server serialises: its own step (the party's lock) and the log and turns (`Roster`'s
condition). A client waiting for its turn holds neither. A client that leaves (its stream ends)
or that sends nothing within the turn deadline (`idle_timeout` of the session), or whose turn
has lasted longer than `turn_timeout` since it was handed out, is dropped: a
partial server step is discarded, as for a one-client session, and the turn passes on. If it
leaves after its step was committed on the server but before its record arrived, θ_s keeps that
step and θ_c never sees it: every remaining client still holds the same θ_c, since only the log
decides it.

Who may join: with `--client-tokens` each id has its own token and a session presenting an id
with another client's token is refused; with one shared token any id is accepted. At most
`max_clients` sessions at once, one per id.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from hosl.federated.records import ClientUpdate
from hosl.federated.sync import ClientBook, RecordSync
from hosl.transport.codec import CodecError, Limits, decode, encode
from hosl.transport.framing import HELLO_LIMIT, Reassembler, to_messages
from hosl.transport.grpc_server import ServerState, SplitServicer, _Disconnected, _Refuse
from hosl.transport.handshake import mismatches
from hosl.transport.inbox import Inbox
from hosl.transport.security import presented_token, token_matches

MAX_CLIENT_ID = 1 << 20
WAIT_TICK_S = 0.5  # how often a waiting turn request looks at the server's stop flag


@dataclass(frozen=True, eq=False)  # compared by identity: one object per session
class ClientHello:
    """The `client` entry of a many-client session's hello."""

    id: int
    cursor: int  # the client holds θ_c after the log's first `cursor` records (0: base model)
    examples: int  # the size of its training file (for the report)
    theta_bytes: int  # |θ_c| in bytes (for FedAvg's 2 × |θ_c| in the report)

    @classmethod
    def parse(cls, value: Any) -> ClientHello:
        if not isinstance(value, dict):
            raise _Refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server trains many clients: start the client with --client-id ID",
            )
        fields = {}
        for name in ("id", "cursor", "examples", "theta_bytes"):
            v = value.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 62:
                raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT,
                              f"malformed hello: client field {name!r} is not a count")
            fields[name] = v
        if fields["id"] >= MAX_CLIENT_ID:
            raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT,
                          f"client id {fields['id']} is too large (at most {MAX_CLIENT_ID - 1})")
        return cls(**fields)


class Roster:
    """The clients, their turns and the update log (`sync`): all under `cond`."""

    def __init__(
        self,
        *,
        max_clients: int,
        min_clients: int,
        total_steps: int,
        committed: Callable[[], int],
        tokens: dict[int, str] | None = None,
        log: logging.Logger | None = None,
        turn_timeout: float | None = None,
    ) -> None:
        self.max_clients, self.min_clients, self.total_steps = max_clients, min_clients, total_steps
        self.committed = committed  # the server's committed steps (the ledger's)
        self.tokens = tokens
        self.log = log or logging.getLogger(__name__)
        self.sync = RecordSync(0)
        self.cond = threading.Condition()
        # connected clients; a session is its hello object (a rejoining id is a new session)
        self.members: dict[int, ClientHello] = {}
        self.sizes: dict[int, int] = {}  # every client seen: its training examples
        self.theta_bytes = 0
        self.holder: ClientHello | None = None  # the session whose turn it is
        self.turn_step = -1  # the step the holder was handed
        # a turn lasts at most this long from when it was handed out (None: no limit), so a
        # holder cannot keep it by sending evaluations more often than the per-frame timeout
        self.turn_timeout = turn_timeout
        self.granted_at = 0.0  # time.monotonic() when the holder got its turn
        self.last = -1  # the previous holder: round-robin goes on after it
        self.started = False  # the first turn was handed out (min_clients had joined)

    # Joining and leaving -------------------------------------------------------------------

    def check_token(self, cid: int, presented: str | None) -> None:
        """With per-client tokens, the id must be the one the token belongs to."""
        if self.tokens is None:
            return
        token = self.tokens.get(cid)
        if token is None or not token_matches(presented, token):
            raise _Refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client id {cid} does not belong to the token presented; each client connects "
                "with its own id and token",
            )

    def book(self, cid: int) -> ClientBook:
        while len(self.sync.books) <= cid:
            self.sync.books.append(ClientBook())
        return self.sync.books[cid]

    def admit(self, hello: ClientHello) -> None:
        with self.cond:
            if hello.id in self.members:
                raise _Refuse(grpc.StatusCode.ALREADY_EXISTS,
                              f"client {hello.id} is already connected")
            if len(self.members) >= self.max_clients:
                raise _Refuse(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server already has {self.max_clients} clients (--max-clients)",
                )
            if hello.cursor > len(self.sync.log):
                raise _Refuse(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the client holds {hello.cursor} records of the update log, the server "
                    f"{len(self.sync.log)}: it belongs to another run; start it afresh",
                )
            self.book(hello.id).cursor = hello.cursor
            self.members[hello.id] = hello
            self.sizes[hello.id] = hello.examples
            self.theta_bytes = hello.theta_bytes
            self.cond.notify_all()

    def holds_turn(self, member: ClientHello) -> bool:
        with self.cond:
            return self.holder is member

    def in_turn(self, member: ClientHello, step: Any) -> bool:
        """May `member` send (a micro-batch of) `step` now: its turn, and the turn's step."""
        with self.cond:
            return self.holder is member and step == self.turn_step and not isinstance(step, bool)

    def overtime(self, member: ClientHello) -> bool:
        """`member` holds the turn and its turn deadline has passed: its session must end."""
        with self.cond:
            return (self.holder is member and self.turn_timeout is not None
                    and time.monotonic() - self.granted_at > self.turn_timeout)

    def leave(self, member: ClientHello) -> bool:
        """`member`'s session ended; True if it held the turn (its partial step must go)."""
        cid = member.id
        with self.cond:
            if self.members.get(cid) is member:
                del self.members[cid]
            held = self.holder is member
            if held:
                if self.committed() > self.turn_step:
                    self.log.warning(
                        "client %d left after the server applied its step %d but before its "
                        "update record arrived: θ_s keeps the step, θ_c never sees it",
                        cid, self.turn_step,
                    )
                self.holder, self.last = None, cid
            self.cond.notify_all()
            return held

    # Turns ---------------------------------------------------------------------------------

    def _next_client(self) -> int | None:
        """Round-robin over the connected clients, after the previous holder."""
        ids = sorted(self.members)
        later = [i for i in ids if i > self.last]
        return (later or ids or [None])[0]

    def wait_turn(self, member: ClientHello, stopping: threading.Event) -> dict[str, Any]:
        """Block until it is `member`'s turn (or training is over); the turn with its catch-up."""
        cid = member.id
        with self.cond:
            if self.holder is member:
                # only this session could commit its turn: waiting here would stall every client
                raise _Refuse(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"client {cid} asked for a turn while holding the turn of step "
                    f"{self.turn_step}; send that step and commit it first",
                )
            while True:
                if self.members.get(cid) is not member:  # its stream ended while it waited
                    raise _Disconnected()
                if stopping.is_set():
                    raise _Refuse(grpc.StatusCode.UNAVAILABLE,
                                  "the server is shutting down; reconnect when it is back")
                if self.holder is None:
                    if self.committed() >= self.total_steps:
                        done = True
                        break
                    ready = self.started or len(self.members) >= self.min_clients
                    if ready and self._next_client() == cid:
                        done = False
                        self.holder, self.turn_step = member, self.committed()
                        self.granted_at = time.monotonic()
                        self.started = True
                        break
                self.cond.wait(WAIT_TICK_S)
            book = self.book(cid)
            records = self.sync.log.encoded_since(book.cursor)
            book.down_bytes += sum(map(len, records))
            book.cursor = len(self.sync.log)
            return {
                "done": done,
                "step": None if done else self.turn_step,
                "local_step": book.steps,
                "records": records,
                "log": len(self.sync.log),
                "committed": self.committed(),
            }

    def commit(self, member: ClientHello, record: bytes | None) -> int:
        """The holder's step is committed on the server; its record joins the log and the turn
        passes on. Returns the log's length."""
        cid = member.id
        with self.cond:
            if self.holder is not member:
                raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION,
                              f"client {cid} committed outside its turn")
            if self.committed() != self.turn_step + 1:
                raise _Refuse(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"client {cid} committed before the server applied its step {self.turn_step}",
                )
            update = None
            if record is not None:
                try:
                    update = ClientUpdate.decode(record)
                except Exception as err:  # struct.error, ValueError, ...: it does not parse
                    raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"malformed update record: {err}") from None
                problem = _record_problem(update, cid, self.turn_step)
                if problem:
                    raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, problem)
            self.sync.commit(cid, update)  # the holder caught up before its step: cursor = end
            self.holder, self.last = None, cid
            self.cond.notify_all()
            return len(self.sync.log)

    # Checkpoint and report -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        with self.cond:
            return {**self.sync.state_dict(), "sizes": dict(self.sizes),
                    "theta_bytes": self.theta_bytes, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.cond:
            self.sync.load_state_dict(state)
            self.sizes = {int(k): int(v) for k, v in state.get("sizes", {}).items()}
            self.theta_bytes = int(state.get("theta_bytes", 0))
            self.last = int(state.get("last", -1))
            self.started = len(self.sync.log) > 0

    def report(self) -> dict[str, Any]:
        """The `clients` block of summary.json, in the in-process run's format (see
        `FederatedRun.report`); clients that never joined have zero steps."""
        with self.cond:
            books = list(self.sync.books)
            participations = sum(b.steps for b in books)
            sync_bytes = sum(b.down_bytes + b.up_bytes for b in books)
            return {
                "n": len(books),
                "schedule": "sequential",
                "order": "round-robin",
                "fraction": 1.0,
                "per_round": len(books),
                "rounds": -(-participations // len(books)) if books else 0,
                "sizes": [self.sizes.get(i, 0) for i in range(len(books))],
                "label_skew": None,  # each client's labels stay on its own machine
                "log_records": len(self.sync.log),
                "log_bytes": self.sync.log.nbytes(),
                "sync_bytes_per_client_round": (
                    sync_bytes / participations if participations else 0
                ),
                "fedavg_bytes_per_client_round": 2 * self.theta_bytes,
                "per_client": [
                    {"examples": self.sizes.get(i, 0), "steps": b.steps,
                     "down_bytes": b.down_bytes, "up_bytes": b.up_bytes}
                    for i, b in enumerate(books)
                ],
                "eval_accuracy_per_client": None,  # each client's own summary has its accuracy
                "networked": True,
            }


def _record_problem(update: ClientUpdate, cid: int, step: int) -> str:
    if update.step != step or update.client != cid:
        return (f"the update record names step {update.step} of client {update.client}, "
                f"not step {step} of client {cid}")
    numbers = [update.lr, update.weight_decay, *(c for _, c in update.coefs)]
    if not all(math.isfinite(x) for x in numbers):
        return "the update record holds a number that is not finite"
    return ""


def pack_records(records: list[bytes]) -> tuple[list[int], torch.Tensor]:
    """Records as one uint8 tensor and their sizes (how a turn reply carries them)."""
    data = b"".join(records)
    tensor = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
              else torch.zeros(0, dtype=torch.uint8))
    return [len(r) for r in records], tensor


def unpack_records(sizes: Any, data: torch.Tensor | None) -> list[bytes]:
    """The inverse of `pack_records`; ValueError on sizes that do not fit the bytes."""
    raw = b"" if data is None else data.numpy().tobytes()
    ok = isinstance(sizes, list) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes
    )
    if not ok or sum(sizes) != len(raw):
        raise ValueError("record sizes do not match the record bytes")
    out, at = [], 0
    for size in sizes:
        out.append(raw[at : at + size])
        at += size
    return out


class MultiClientServicer(SplitServicer):
    """`SplitServicer` for many concurrent client sessions with turns (see the module doc)."""

    def __init__(self, state: ServerState, roster: Roster,
                 on_record: Callable[[int], None] = lambda step: None) -> None:
        super().__init__(state)
        self.roster = roster
        self.on_record = on_record  # called with the server's committed step after each record
        self._leaving = threading.Lock()
        self._left: set[ClientHello] = set()  # sessions ended (ids may come back: new sessions)

    def session(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = context.peer()
        log = self.state.log
        inbox = Inbox(messages, Reassembler(HELLO_LIMIT, self.state.budget))
        member: ClientHello | None = None
        try:
            hello = self._hello(inbox)
            problem = mismatches(self.state.identity, hello["identity"])
            if problem is not None:
                raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION, f"handshake refused: {problem}")
            client = ClientHello.parse(hello.get("client"))
            self.roster.check_token(client.id, presented_token(context.invocation_metadata()))
            self._check_run(hello["run"])
            self.roster.admit(client)
            member = client
            # A client that vanishes while its session waits for a turn is noticed here: gRPC
            # stops reading a cancelled call's replies, so the wait itself may never return.
            context.add_callback(lambda: self._call_ended(client))
            inbox.assembler.limit = self.state.session_frame_limit(hello["run"])
            log.info("client %d (%s) joined at step %d holding %d log records", client.id, peer,
                     self.state.ledger.committed, client.cursor)
            yield from self._serve_member(inbox, hello["wire_dtype"], hello["run"], client)
            log.info("client %d closed its session", client.id)
        except _Refuse as refusal:
            log.warning("refused client %s%s: %s", peer,
                        "" if member is None else f" (client {member.id})", refusal)
            context.abort(refusal.code, str(refusal))
        except _Disconnected:
            log.info("client %s disconnected", peer if member is None else member.id)
        finally:
            inbox.close()
            if member is not None:
                self._leave(member)

    def _call_ended(self, member: ClientHello) -> None:
        """gRPC's termination callback, on its one polling thread: `_leave` waits for the step
        lock and writes a checkpoint, and a turn holder inside its step holds that lock while it
        waits for frames only this thread delivers, so the leaving happens on a thread of its own
        (not a daemon: the checkpoint it writes must not be cut off at exit)."""
        threading.Thread(target=self._leave, args=(member,), name=f"hosl-leave-{member.id}").start()

    def _leave(self, member: ClientHello) -> None:
        """End `member`'s session (once, from the session or gRPC's termination callback)."""
        with self._leaving:
            if member in self._left:
                return
            self._left.add(member)
        state, cid = self.state, member.id
        with state.lock:
            if self.roster.holds_turn(member) and state.ledger.open_step is not None:
                state.log.warning("client %d left during step %d; its partial step was discarded",
                                  cid, state.ledger.open_step)
                state.ledger.abort()
                state.party.discard_partial_step()
        held = self.roster.leave(member)
        state.log.info("client %d left%s", cid, "; the turn passes on" if held else "")
        state.on_session_end()

    def _serve_member(
        self, inbox: Inbox, wire: torch.dtype, run: dict[str, Any], member: ClientHello
    ) -> Iterator[bytes]:
        cid = member.id
        welcome = {"committed": self.state.ledger.committed, "log": len(self.roster.sync.log),
                   "steps": self.roster.total_steps}
        yield from to_messages(encode("welcome", welcome, {}))
        while not self.state.stopping.is_set():
            try:
                head = self._next(inbox)
            except _Disconnected:
                return
            try:
                limits = Limits(max_message_bytes=inbox.assembler.limit)
                kind, scalars, tensors = decode(head, limits)
            except CodecError as err:
                raise _Refuse(
                    grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}"
                ) from None
            if self.roster.overtime(member):  # its partial step is discarded as it leaves
                raise _Refuse(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"client {cid} held its turn longer than --turn-timeout "
                    f"({self.roster.turn_timeout:g} s); the turn passes on",
                )
            if kind == "turn":
                turn = self.roster.wait_turn(member, self.state.stopping)
                sizes, data = pack_records(turn.pop("records"))
                yield from to_messages(encode("turn", {**turn, "sizes": sizes,
                                                       **self._report_if(turn["done"])},
                                              {"records": data}))
            elif kind == "commit":
                record = tensors.get("record")
                length = self.roster.commit(
                    member, None if record is None else record.numpy().tobytes()
                )
                self.on_record(self.state.ledger.committed)
                yield from to_messages(encode("committed", {"log": length}, {}))
            elif kind.endswith("StepRequest") and not self.roster.in_turn(member,
                                                                          scalars.get("step")):
                # one step per turn: a second one would move θ_s with no record in the log
                raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION,
                              f"client {cid} sent step {scalars.get('step')!r:.20} outside its "
                              "turn; ask for a turn first")
            elif kind == "journal":
                raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION,
                              "a many-client server keeps an update log, not a journal to replay")
            elif kind == "EvalRequest" or kind.endswith("StepRequest"):  # a step: in its turn
                # a refused request from a session without the turn must leave the holder's
                # partly received step alone
                owns_step = self.roster.holds_turn(member)
                yield from to_messages(self._answer(head, inbox, wire, run, owns_step=owns_step))
            else:
                raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT,
                              f"client {cid} sent an unexpected message {kind!r:.40}; a "
                              "many-client session takes turn, commit, steps and evaluations")
        raise _Refuse(
            grpc.StatusCode.UNAVAILABLE, "the server is shutting down; reconnect when it is back"
        )

    def _report_if(self, done: bool) -> dict[str, Any]:
        return {"report": self.roster.report()} if done else {}
