"""Many `hosl client` processes training one split model with one `hosl serve`.

Every client holds the same client part θ_c; no parameter crosses the wire. The server keeps the
ordered log of every applied client update (`hosl.federated.records`) and hands out turns
(the sequential schedule: round-robin over the connected clients, or in rounds that each draw
some of them, `clients.order sampled` / `clients.fraction`). One turn, on a client's stream:

    client: turn {}                      server: a client lacking records gets them at once, no
                                             turn: catch_up {up to 64 records, log, digest}
                                             (only one more than 64 behind loses its place
                                             in line); else, when it is this client's turn:
                                             turn {step, local_step, records it lacks, digest}
    client: replays the records (checks the log's length and chain digest), then asks again
            (catch_up) or sends the step (head + parts, as a one-client session)
                                         server: the step's reply (θ_s steps, as ever)
    client: commit {its update record}   server: checks the record; committed {log length,
                                             digest}; the turn passes on

When the server has committed all its steps, a turn request is answered `done` with the last
records, so every client ends holding the whole log: bit-identical θ_c everywhere.

At join the hello says how many log records the client's θ_c holds and their chain digest: a
client that holds more records than the log, or other ones, is refused (see `Roster.admit`).

What the server serialises: its own step (the party's lock) and the log and turns (`Roster`'s
condition). A client waiting for its turn holds neither. A client that leaves (its stream ends)
or whose turn is silent for `turn_timeout` (the idle timeout otherwise), or whose turn
has lasted longer than `turn_timeout` since it was handed out, is dropped: a
partial server step is discarded, as for a one-client session, and the turn passes on. If it
leaves after its step was committed on the server but before its record arrived, θ_s keeps that
step and θ_c never sees it: every remaining client still holds the same θ_c, since only the log
decides it.

Who may join: with `--client-tokens` each id has its own token and a session presenting an id
with another client's token is refused; with one shared token any id is accepted. At most
`max_clients` sessions at once, one per id, all of one run (the hello's run fingerprint).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import torch

from hosl.federated.records import LOG_GENESIS, ClientUpdate
from hosl.federated.schedule import ClientSchedule
from hosl.federated.sync import ClientBook, RecordSync
from hosl.transport.codec import CodecError, Limits, decode, encode
from hosl.transport.framing import HELLO_LIMIT, Reassembler, to_messages
from hosl.transport.grpc_server import ServerState, SplitServicer, _Disconnected, _Refuse
from hosl.transport.handshake import mismatches
from hosl.transport.inbox import Inbox
from hosl.transport.security import presented_token, token_matches

MAX_CLIENT_ID = 1 << 20
WAIT_TICK_S = 0.5  # how often a waiting turn request looks at the server's stop flag
# A server keeps a book (log position and bytes) for each client id that ever joined, made when
# it first joins: at most this many ids per --max-clients slot, whatever the ids' values.
IDS_PER_SLOT = 16
# The most records one catch-up answer carries: a long log arrives in pieces, each replayed
# within the idle timeout, and no message grows with the log.
CATCH_UP_RECORDS = 64
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, eq=False)  # compared by identity: one object per session
class ClientHello:
    """The `client` entry of a many-client session's hello."""

    id: int
    cursor: int  # the client holds θ_c after the log's first `cursor` records (0: base model)
    examples: int  # the size of its training file (for the report)
    theta_bytes: int  # |θ_c| in bytes (for FedAvg's 2 × |θ_c| in the report)
    # the chain digest of the `cursor` records it applied (hosl.federated.records.chain), hex
    digest: str = LOG_GENESIS.hex()

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
        digest = value.get("digest")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT,
                          "malformed hello: client field 'digest' is not a sha256 hex digest")
        fields["digest"] = digest
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
        grad_accum: int = 1,
        row_limits: Mapping[str, int] | None = None,
        order: str = "round-robin",
        fraction: float = 1.0,
        seed: int = 0,
        parallel: bool = False,
    ) -> None:
        self.max_clients, self.min_clients, self.total_steps = max_clients, min_clients, total_steps
        self.committed = committed  # the server's committed steps (the ledger's)
        self.tokens = tokens
        self.log = log or logging.getLogger(__name__)
        self.sync = RecordSync(0)  # its log; the books are `books` below (by id, made lazily)
        self.cond = threading.Condition()
        # connected clients; a session is its hello object (a rejoining id is a new session)
        self.members: dict[int, ClientHello] = {}
        self.books: dict[int, ClientBook] = {}  # every client id that joined: its log position
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
        # clients replaying a catch-up (see `wait_turn`): round-robin passes them over
        self.catching_up: set[int] = set()
        # Rounds (`clients.order sampled` or `clients.fraction` below 1; see `_round_plan`): each
        # round draws its clients from those that can step when it begins. None: plain turns,
        # round-robin over every connected client.
        plain = order == "round-robin" and fraction == 1.0 and not parallel
        self.rounds = None if plain else (order, fraction)
        self.seed = seed
        self.round = 0  # rounds drawn so far
        self.round_left: list[int] = []  # the current round's clients that have not stepped
        # The parallel schedule: a round's records wait here, in the order committed, and join
        # the log when the round ends, so every client of a round steps on the θ_c it began with.
        self.parallel = parallel
        self.pending: list[tuple[ClientUpdate, bytes]] = []
        # What a committed record may hold: q · grad_accum (seed, c) pairs (q from `run`), and
        # row ids only of the client part's embeddings, each below its row count.
        self.grad_accum = grad_accum
        self.row_limits = dict(row_limits or {})
        # the run fingerprint (seed, q, lr, adapter, ...) every admitted client shares; None
        # until the first client joins (or from the server's checkpoint)
        self.run: dict[str, Any] | None = None

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

    def admit(self, hello: ClientHello, run: dict[str, Any] | None = None) -> None:
        """Join `hello`'s session: refused unless there is room, its run fingerprint `run` is the
        admitted clients' (the first clients are compared with each other too) and its θ_c is
        the log's first `cursor` records (cursor and chain digest)."""
        with self.cond:
            if hello.id in self.members:
                raise _Refuse(grpc.StatusCode.ALREADY_EXISTS,
                              f"client {hello.id} is already connected")
            if len(self.members) >= self.max_clients:
                raise _Refuse(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server already has {self.max_clients} clients (--max-clients)",
                )
            if run is not None:
                self._check_run(run)
            if hello.id not in self.books and len(self.books) >= IDS_PER_SLOT * self.max_clients:
                raise _Refuse(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server has seen {len(self.books)} client ids ({IDS_PER_SLOT} × "
                    f"--max-clients); rejoin with an id that trained before",
                )
            self._check_position(hello)
            if run is not None:
                self.run = dict(run)
            self.books.setdefault(hello.id, ClientBook()).cursor = hello.cursor
            self.members[hello.id] = hello
            self.sizes[hello.id] = hello.examples
            self.theta_bytes = hello.theta_bytes
            self.cond.notify_all()

    def _check_run(self, run: dict[str, Any]) -> None:
        """Every client of one log trains the same run: its records mean the same θ_c only from
        the same base (adapter, its seed) with the same settings. A fresh server (no client, no
        record, no step) takes the first client's run; later clients must match it."""
        fresh = not self.members and len(self.sync.log) == 0 and self.committed() == 0
        if self.run is None or fresh:
            return
        diffs = [
            f"{key}: server run {self.run.get(key)!r}, client {run.get(key)!r}"
            for key in sorted(set(self.run) | set(run))
            if self.run.get(key) != run.get(key)
        ]
        if diffs:
            committed = self.committed()
            what = (f"the server has committed {committed} steps of another run" if committed
                    else "the clients already connected train another run")
            raise _Refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{what} (" + "; ".join(diffs) + "); use the same settings, or start the "
                "server with a new --output",
            )

    def _check_position(self, hello: ClientHello) -> None:
        """The client's θ_c must be the log's first `cursor` records: never more records than
        the log holds, and the same ones (the chain digests agree)."""
        held, cid = len(self.sync.log), hello.id
        fresh = "start it afresh from the base model (a new --output, without --resume)"
        if hello.cursor > held:
            raise _Refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"client {cid} has applied {hello.cursor} records of the update log, the server "
                f"holds {held}: the server restarted from a checkpoint older than the client's, "
                f"or the client belongs to another run; {fresh}",
            )
        if hello.digest != self.sync.log.digest(hello.cursor).hex():
            raise _Refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"client {cid}'s first {hello.cursor} update records are not the server's (their "
                "chain digests differ): it trained ahead of a server that restarted and has "
                f"since logged other steps, or in another run; {fresh}",
            )

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

    def turn_left(self, member: ClientHello) -> float | None:
        """Seconds left of `member`'s turn (negative once over), or None: it holds no turn, or
        turns have no deadline."""
        with self.cond:
            if self.holder is not member or self.turn_timeout is None:
                return None
            return self.turn_timeout - (time.monotonic() - self.granted_at)

    def step_applied(self, member: ClientHello) -> bool:
        """`member` holds the turn and the server has applied its step (its commit is due)."""
        with self.cond:  # (re-entrant: commit_due takes it again)
            return self.holder is member and self.commit_due()

    def commit_due(self) -> bool:
        """A holder's step is applied on the server and its record is not in the log yet: θ_s
        is a step ahead of the log until the commit arrives (or the holder leaves)."""
        with self.cond:
            return self.holder is not None and self.committed() > self.turn_step

    def leave(self, member: ClientHello) -> bool:
        """`member`'s session ended; True if it held the turn (its partial step must go)."""
        cid = member.id
        with self.cond:
            if self.members.get(cid) is member:
                del self.members[cid]
                self.catching_up.discard(cid)
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
        """Round-robin over the connected clients, after the previous holder; a client replaying
        a catch-up is passed over (it holds no turn, and the others need not wait for it).
        With rounds: the next client of the round (`_round_plan`)."""
        ids = sorted(set(self.members) - self.catching_up)
        if self.rounds is not None:
            return (self._round_plan(ids)[0] or [None])[0]
        later = [i for i in ids if i > self.last]
        return (later or ids or [None])[0]

    def _round_plan(self, ready: list[int]) -> tuple[list[int], bool]:
        """The clients of the current round that may still step, in order, of `ready` (the
        connected clients not replaying a catch-up, sorted); when none is left, the next round's
        draw, and True. A drawn client that left or is replaying when its turn comes is dropped
        from the round, as a client that does not answer is: nobody waits for it.

        A round holds m = max(1, round(fraction · n)) of the n ready clients: `sampled` draws
        them at random (seeded by the run's seed and the round's number), `round-robin` takes
        the m after the previous holder. Pure: `_begin_turn` makes the plan the round's."""
        left = [i for i in self.round_left if i in ready]
        if left or not ready:
            return left, False
        assert self.rounds is not None
        order, fraction = self.rounds
        # the in-process schedule's m and seeded draw, over the ready clients' positions
        schedule = ClientSchedule(len(ready), order, fraction, self.seed)
        if order == "sampled":
            return [ready[i] for i in schedule.round_clients(self.round)], True
        after = [i for i in ready if i > self.last] + [i for i in ready if i <= self.last]
        return after[:schedule.per_round], True

    def _begin_turn(self, cid: int) -> None:
        """`cid` got the turn: with rounds, it leaves its round (a new one if it began it, which
        first closes the last: see `_close_round`)."""
        if self.rounds is None:
            return
        plan, new = self._round_plan(sorted(set(self.members) - self.catching_up))
        assert plan and plan[0] == cid, "the turn went to the round's next client"
        if new:
            self._close_round()
        self.round += int(new)
        self.round_left = plan[1:]

    def _close_round(self) -> None:
        """Parallel: the ended round's records join the log, in the order they were committed
        (the round's order); every client applies them at its next turn, its own included."""
        for update, record in self.pending:
            self.sync.log.append_encoded(update, record)
        self.pending = []

    def wait_turn(self, member: ClientHello, stopping: threading.Event) -> dict[str, Any]:
        """Block until it is `member`'s turn (or training is over); the turn with its catch-up.

        A client that lacks records when it asks is answered at once, without the turn, with
        the next `CATCH_UP_RECORDS` of them (`catch_up`); it replays them and asks again. A
        client more than `CATCH_UP_RECORDS` behind (a late joiner, a resumed client) is passed
        over while it replays, so it replays a long log holding no turn while the others step,
        and no turn deadline counts the replay. A client fewer records behind (it asked after
        another client's step) keeps its place in line: the order of the turns does not depend
        on when the requests arrive. A turn brings only the records logged while its client
        waited for it, at most one per other client."""
        cid = member.id
        with self.cond:
            if self.holder is member:
                # only this session could commit its turn: waiting here would stall every client
                raise _Refuse(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"client {cid} asked for a turn while holding the turn of step "
                    f"{self.turn_step}; send that step and commit it first",
                )
            book = self.books[cid]
            lag = len(self.sync.log) - book.cursor
            if lag and self.members.get(cid) is member:
                if lag > CATCH_UP_RECORDS:
                    self.catching_up.add(cid)
                    self.cond.notify_all()  # the turn may now pass to another client
                return self._answer(book, done=False, catch_up=True)
            if cid in self.catching_up:
                self.catching_up.discard(cid)
                self.cond.notify_all()
            while True:
                if self.members.get(cid) is not member:  # its stream ended while it waited
                    raise _Disconnected()
                if stopping.is_set():
                    raise _Refuse(grpc.StatusCode.UNAVAILABLE,
                                  "the server is shutting down; reconnect when it is back")
                if self.holder is None:
                    if self.committed() >= self.total_steps:
                        self._close_round()  # the last round's records reach everyone
                        done = True
                        break
                    ready = self.started or len(self.members) >= self.min_clients
                    if ready and self._next_client() == cid:
                        done = False
                        self._begin_turn(cid)
                        self.holder, self.turn_step = member, self.committed()
                        self.granted_at = time.monotonic()
                        self.started = True
                        break
                self.cond.wait(WAIT_TICK_S)
            if done and len(self.sync.log) - book.cursor > CATCH_UP_RECORDS:
                return self._answer(book, done=False, catch_up=True)
            return self._answer(book, done=done, catch_up=False)

    def _answer(self, book: ClientBook, *, done: bool, catch_up: bool) -> dict[str, Any]:
        """A turn answer carrying the records `book`'s client lacks (a catch-up: at most
        `CATCH_UP_RECORDS` of them), counted as downloaded; under `cond`."""
        log = self.sync.log
        stop = min(len(log), book.cursor + CATCH_UP_RECORDS) if catch_up else len(log)
        records = log.encoded_since(book.cursor, stop)
        book.down_bytes += sum(map(len, records))
        book.cursor = stop
        return {
            "done": done,
            "catch_up": catch_up,
            "step": None if done or catch_up else self.turn_step,
            "local_step": book.steps,
            "records": records,
            "log": stop,  # the client holds this many records once it replayed these
            "digest": log.digest(stop).hex(),  # ... with this chain digest
            "committed": self.committed(),
            # parallel: the client keeps its θ_c through its step (its record comes back with
            # the round's others); absent means apply it at once, as older servers did
            "deferred": self.parallel,
        }

    def commit(self, member: ClientHello, record: bytes | None) -> int:
        """The holder's step is committed on the server; its record joins the log (parallel:
        when its round ends) and the turn passes on. Returns the log's length. A record that
        breaks a rule is refused before anything (log, books, turn) changes."""
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
                problem = self._record_problem(update, record, cid)
                if problem:
                    raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, problem)
            book, log = self.books[cid], self.sync.log
            if book.cursor != len(log):  # its turn brought the whole log: cannot happen
                raise RuntimeError(f"client {cid} stepped at log position {book.cursor} of "
                                   f"{len(log)}")
            book.steps += 1
            if update is not None and record is not None:
                book.up_bytes += len(record)
                if self.parallel:  # its θ_c stays the round's: the record comes back with the
                    self.pending.append((update, bytes(record)))  # others' after the round
                else:
                    log.append_encoded(update, bytes(record))  # = update.encode(): checked
                    book.cursor = len(log)
            self.holder, self.last = None, cid
            self.cond.notify_all()
            return len(log)

    def _record_problem(self, update: ClientUpdate, raw: bytes, cid: int) -> str:
        """Why the log must not take `update` (every client replays a logged record, for good,
        so one that would fail or mean something else on replay is refused), or ""."""
        step = self.turn_step
        if update.step != step or update.client != cid:
            return (f"the update record names step {update.step} of client {update.client}, "
                    f"not step {step} of client {cid}")
        numbers = [update.lr, update.weight_decay, *(c for _, c in update.coefs)]
        if not all(math.isfinite(x) for x in numbers):
            return "the update record holds a number that is not finite"
        if update.encode() != raw:  # the clients chain the bytes they sent into their digest
            return "the update record is not in its canonical encoding"
        run = self.run or {}
        q = run.get("q")
        if isinstance(q, int) and len(update.coefs) != q * self.grad_accum:
            return (f"the update record holds {len(update.coefs)} (seed, coefficient) pairs; a "
                    f"step of this run has q × grad_accum = {q} × {self.grad_accum}")
        top = run.get("client_lr")
        top = float(top) if isinstance(top, (int, float)) else math.inf
        if not 0.0 <= update.lr <= top:
            return (f"the update record's learning rate {update.lr!r} is outside 0..{top!r} "
                    "(the run's client learning rate, which a schedule only lowers)")
        if update.weight_decay < 0:
            return f"the update record's weight decay {update.weight_decay!r} is negative"
        for per_name in (update.rows or {}).values():
            for name, ids in per_name.items():
                limit = self.row_limits.get(name)
                if limit is None:
                    return (f"the update record has row ids for {name!r:.80}, which is not an "
                            "embedding of the client part")
                if ids.numel() and not (
                    int(ids[0]) >= 0 and int(ids[-1]) < limit and bool((ids[1:] > ids[:-1]).all())
                ):
                    return (f"the update record's row ids for {name!r} are not sorted distinct "
                            f"ids in 0..{limit - 1} (the embedding's rows)")
        return ""

    # Checkpoint and report -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        with self.cond:
            ids = sorted(self.books)
            return {"log": self.sync.log.state_dict(),
                    "books": [asdict(self.books[i]) for i in ids], "book_ids": ids,
                    "sizes": dict(self.sizes), "theta_bytes": self.theta_bytes, "last": self.last,
                    "round": self.round, "round_left": list(self.round_left),
                    "pending": [record for _, record in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.cond:
            self.sync.log.load_state_dict(state["log"])
            books = state["books"]
            self.sizes = {int(k): int(v) for k, v in state.get("sizes", {}).items()}
            if "book_ids" in state:
                self.books = {int(i): ClientBook(**b) for i, b in zip(state["book_ids"], books)}
            else:  # older checkpoints: a list by id, with an empty book for every id below the
                # highest that joined; keep the ids that did join (IDS_PER_SLOT, the report)
                self.books = {i: ClientBook(**b) for i, b in enumerate(books)
                              if i in self.sizes or ClientBook(**b) != ClientBook()}
            self.theta_bytes = int(state.get("theta_bytes", 0))
            self.last = int(state.get("last", -1))
            self.round = int(state.get("round", 0))  # absent in older checkpoints: plain turns
            self.round_left = [int(i) for i in state.get("round_left", [])]
            self.pending = [(ClientUpdate.decode(r), bytes(r)) for r in state.get("pending", [])]
            self.started = len(self.sync.log) > 0 or bool(self.pending)

    def report(self) -> dict[str, Any]:
        """The `clients` block of summary.json, in the in-process run's format (see
        `FederatedRun.report`), over the client ids that joined, in id order (`ids`)."""
        with self.cond:
            ids = sorted(self.books)
            books = [self.books[i] for i in ids]
            participations = sum(b.steps for b in books)
            sync_bytes = sum(b.down_bytes + b.up_bytes for b in books)
            order, fraction = self.rounds or ("round-robin", 1.0)
            return {
                "n": len(books),
                "ids": ids,
                "schedule": "parallel" if self.parallel else "sequential",
                "order": order,
                "fraction": fraction,
                # with rounds, m of the clients connected when a round began; else every client
                "per_round": (max(1, round(fraction * len(books))) if self.rounds
                              else len(books)),
                "rounds": (self.round if self.rounds
                           else -(-participations // len(books)) if books else 0),
                "sizes": [self.sizes.get(i, 0) for i in ids],
                "label_skew": None,  # each client's labels stay on its own machine
                "sync": "records",  # a many-client server relays records; it serves no SplitFed
                "log_records": len(self.sync.log),
                "log_bytes": self.sync.log.nbytes(),
                # a ZO server's own updates stay on the server: no client replays them, so no
                # log of them is kept (in process one is, for a ZO-ZO run's checkpoint)
                "server_log_records": None,
                "server_log_bytes": None,
                "sync_bytes_per_client_round": (
                    sync_bytes / participations if participations else 0
                ),
                "fedavg_bytes_per_client_round": 2 * self.theta_bytes,
                "per_client": [
                    {"id": i, "examples": self.sizes.get(i, 0), "steps": b.steps,
                     "down_bytes": b.down_bytes, "up_bytes": b.up_bytes}
                    for i, b in zip(ids, books)
                ],
                "eval_accuracy_per_client": None,  # each client's own summary has its accuracy
                "networked": True,
            }


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
        self._member_of: dict[int, ClientHello] = {}  # id(inbox) -> its session, while it runs
        if roster.run is None:  # a resumed server's run: its clients' fingerprint
            roster.run = state.run_fingerprint

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
            self._check_seed(hello["run"])
            self.roster.admit(client, hello["run"])  # compares its run with the others'
            member = client
            self.state.run_fingerprint = self.roster.run  # what the server's checkpoint keeps
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
        self._member_of[id(inbox)] = member
        try:
            yield from self._serve_turns(inbox, wire, run, member)
        finally:
            del self._member_of[id(inbox)]

    def _frame_timeout(self, inbox: Any) -> float:
        """A session waits this long for a frame: the turn holder at most what is left of its
        turn, any other session (between turns, or replaying a catch-up) the idle timeout."""
        member = self._member_of.get(id(inbox))
        left = None if member is None else self.roster.turn_left(member)
        # what is left of the turn, not a whole --turn-timeout per frame (a turn of many frames
        # would otherwise outlast its deadline); never 0, so a frame due now is still read
        return self.state.idle_timeout if left is None else min(self.state.idle_timeout,
                                                                 max(left, 0.05))

    def _timeout_message(self, inbox: Any, timeout: float) -> str:
        member = self._member_of.get(id(inbox))
        if member is not None and self.roster.turn_left(member) is not None \
                and timeout < self.state.idle_timeout:  # the turn's deadline ran out
            return (f"client {member.id} sent nothing more before its turn's deadline "
                    f"(--turn-timeout {self.roster.turn_timeout:g} s); the turn passes on")
        return super()._timeout_message(inbox, timeout)

    def _serve_turns(
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
            # its partial step is discarded as it leaves; a commit whose server step is already
            # applied still lands (refusing it would leave θ_s a step no client's log holds)
            if self.roster.overtime(member) and not (
                kind == "commit" and self.roster.step_applied(member)
            ):
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
                digest = self.roster.sync.log.digest(length).hex()  # append-only: still this
                yield from to_messages(encode("committed", {"log": length, "digest": digest}, {}))
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
