"""The server's record of steps: which one is open, which are committed, what each answered.

A step is committed when its last micro-batch (`update=True`) has been applied; `committed` is the
number of committed steps, so the next step id the server accepts is `committed`. The rules:

- a head for step `committed` opens (or continues) that step, micro-batches in order;
- a head for an earlier step is a retry (the client lost the reply): it is answered from the
  record, never applied twice;
- a head for a later step is refused: the client would skip steps the server never saw.

The journal keeps every committed reply of `hosl` and `zo` steps (2Q losses and a few scalars per
micro-batch), one JSON line each in `journal.jsonl`. It is what lets a client that lost its state,
or that comes after another client, replay the client's ZO updates up to `committed` without a
single forward pass on the server: a ZO update is fully described by (step, seeds, losses). `fo`
replies carry ∂L/∂h tensors, so only the last committed step's replies are kept, in memory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hosl.transport.messages import FoStepReply, HoslStepReply, ZoStepReply

REPLAYABLE: dict[str, type] = {"HoslStepReply": HoslStepReply, "ZoStepReply": ZoStepReply}


class StepRefused(Exception):
    """A step head the server must not accept: ahead of the server, or out of order."""


@dataclass
class Journal:
    """Committed replies, in memory and (when given a path) in an append-only JSONL file."""

    path: Path | None = None
    entries: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | None, committed: int) -> Journal:
        """Load the journal of a run, keeping only steps below `committed` (the checkpoint's);
        entries written after the checkpoint describe steps the server no longer has."""
        journal = cls(path)
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(entry, dict) and 0 <= entry.get("step", -1) < committed:
                    journal.entries.setdefault(entry["step"], []).append(entry)
            kept = [e for step in sorted(journal.entries) for e in journal.entries[step]]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
            tmp.replace(path)
        return journal

    def append(self, step_entries: list[dict[str, Any]]) -> None:
        if not step_entries:
            return
        self.entries[step_entries[0]["step"]] = step_entries
        if self.path is not None:
            with open(self.path, "a") as out:
                out.write("".join(json.dumps(e) + "\n" for e in step_entries))
                out.flush()

    def between(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Entries of steps start..stop-1, in order; raises KeyError if one is missing."""
        out: list[dict[str, Any]] = []
        for step in range(start, stop):
            out.extend(self.entries[step])
        return out


def journal_entry(step: int, micro: int, reply: Any, up: int, down: int) -> dict[str, Any]:
    record = (
        {"loss": reply.loss} if isinstance(reply, FoStepReply) else dataclasses.asdict(reply)
    )
    return {
        "step": step,
        "micro": micro,
        "kind": type(reply).__name__,
        "reply": record,
        "up": up,
        "down": down,
    }


def reply_from_entry(entry: dict[str, Any]) -> Any:
    """The reply object a journal entry records; ValueError for an `fo` reply (not replayable)."""
    cls = REPLAYABLE.get(entry.get("kind", ""))
    if cls is None:
        raise ValueError(f"step {entry.get('step')} was an fo step; its reply cannot be replayed")
    return cls(**entry["reply"])


@dataclass
class StepLedger:
    committed: int = 0
    journal: Journal = field(default_factory=Journal)
    open_step: int | None = None  # the step whose micro-batches are arriving
    next_micro: int = 0
    _pending: list[dict[str, Any]] = field(default_factory=list)  # journal entries of open_step
    _pending_bytes: dict[int, bytes] = field(default_factory=dict)
    _last_bytes: dict[tuple[int, int], bytes] = field(default_factory=dict)

    def is_retry(self, step: int, micro: int) -> bool:
        """True for a step already committed; raises StepRefused for one that must not run."""
        if step < self.committed:
            return True
        if step > self.committed:
            raise StepRefused(
                f"step {step} is ahead of the server, which has committed {self.committed} "
                f"steps; the next step it accepts is {self.committed}"
            )
        if micro != self.next_micro:
            raise StepRefused(
                f"micro-batch {micro} of step {step} arrived out of order; "
                f"expected micro-batch {self.next_micro}"
            )
        return False

    def record(
        self, step: int, micro: int, update: bool, reply: Any, encoded: bytes, up: int
    ) -> bool:
        """Note one applied micro-batch; on the step's last one, commit it. True if committed."""
        self.open_step = step
        self._pending.append(journal_entry(step, micro, reply, up, len(encoded)))
        self._pending_bytes[micro] = encoded
        self.next_micro = micro + 1
        if not update:
            return False
        self.journal.append(self._pending)
        self._last_bytes = {(step, m): b for m, b in self._pending_bytes.items()}
        self.committed = step + 1
        self.abort()
        return True

    def abort(self) -> None:
        """Forget the open step (its party-side effects are the caller's to discard)."""
        self.open_step, self.next_micro = None, 0
        self._pending, self._pending_bytes = [], {}

    def retry_reply(self, step: int, micro: int) -> tuple[bytes | None, Any]:
        """(encoded reply, None) from the last step's cache, else (None, reply object) from the
        journal. Raises StepRefused when neither holds it."""
        cached = self._last_bytes.get((step, micro))
        if cached is not None:
            return cached, None
        for entry in self.journal.entries.get(step, []):
            if entry["micro"] == micro:
                try:
                    return None, reply_from_entry(entry)
                except ValueError as err:
                    raise StepRefused(str(err)) from None
        raise StepRefused(f"the server has no record of step {step} micro-batch {micro}")
