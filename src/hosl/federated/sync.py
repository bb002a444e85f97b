"""The server's side of the record sync: the update log and each client's place in it.

Every client holds the same θ_c. Before a client steps it asks for the records it has not applied
(`catch_up`: everything in the log past its cursor) and replays them; after its step it uploads
its own update (`commit`), which the server appends to the log. A client that joins late starts
from the base model with cursor 0 and catches up with the whole log (`join`).

The bytes each client moves are counted here from the records' encodings: downloaded (catch-up)
and uploaded (its own updates). They are the whole cost of keeping θ_c in sync; FedAvg would move
θ_c itself down and up, 2 × |θ_c| bytes per participant per round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hosl.federated.records import ClientUpdate, UpdateLog


@dataclass
class ClientBook:
    """One client's place in the log and its sync traffic."""

    cursor: int = 0  # the client holds θ_c after the log's first `cursor` records
    down_bytes: int = 0  # records downloaded to catch up
    up_bytes: int = 0  # its own records uploaded
    steps: int = 0  # steps it took


class RecordSync:
    """The update log and the clients' cursors: `catch_up` before a step, `commit` after it."""

    def __init__(self, n_clients: int) -> None:
        self.log = UpdateLog()
        self.books = [ClientBook() for _ in range(n_clients)]

    def join(self) -> int:
        """A new client, holding the base θ_c: its id. Its first `catch_up` is the whole log."""
        self.books.append(ClientBook())
        return len(self.books) - 1

    def catch_up(self, client: int) -> list[ClientUpdate]:
        """The records `client` lacks; it holds the whole log after. Its own records (the
        parallel schedule appends them after its step) it kept, so only the others' count as
        downloaded."""
        book = self.books[client]
        sized = self.log.sized_since(book.cursor)
        book.down_bytes += sum(size for record, size in sized if record.client != client)
        book.cursor = len(self.log)
        return [record for record, _ in sized]

    def commit(self, client: int, update: ClientUpdate | None) -> None:
        """`client`'s step is done; `update` (None: the step changed no client parameter) is
        uploaded and appended. The client applied it itself, so its cursor moves past it; that is
        exact only when it had caught up with the whole log before stepping (the sequential
        schedule), which is checked."""
        book = self.books[client]
        if book.cursor != len(self.log):
            raise RuntimeError(
                f"client {client} stepped at log position {book.cursor} of {len(self.log)}"
            )
        book.steps += 1
        if update is None:
            return
        self.log.append([update])
        book.up_bytes += self.log.nbytes(len(self.log) - 1)
        book.cursor = len(self.log)

    def commit_round(self, updates: list[tuple[int, ClientUpdate | None]]) -> list[ClientUpdate]:
        """The parallel schedule: a round's (client, update) pairs, all computed on the same θ_c,
        appended in this (the schedule's) order; every client applies them in that order at its
        next catch-up. Returns the records appended."""
        records = []
        for client, update in updates:
            book = self.books[client]
            book.steps += 1
            if update is None:
                continue
            self.log.append([update])
            book.up_bytes += self.log.nbytes(len(self.log) - 1)
            records.append(update)
        return records

    def state_dict(self) -> dict[str, Any]:
        return {"log": self.log.state_dict(), "books": [asdict(b) for b in self.books]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.load_state_dict(state["log"])
        self.books = [ClientBook(**b) for b in state["books"]]
