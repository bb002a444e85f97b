"""SplitFed: many first-order (`fo`) clients, kept in sync by averaging their client models.

An `fo` client's update is a gradient step the size of θ_c, so it cannot travel as a record; the
baseline the records are measured against is FedAvg of the client models (SplitFed). Each client
downloads the current θ_c, takes its step on its own data, and uploads its model: 2 × |θ_c| bytes
per client per round (`theta_bytes` each way, trainable tensors only: with LoRA, the adapters).

- parallel schedule: every client of a round starts from the θ_c the round began with; when the
  round ends θ_c becomes the plain mean of the round's client models (SplitFed, FedAvg: its
  weights are the examples each client trained on in the round, one batch each, so equal).
- sequential schedule: each client starts from the model its predecessor uploaded (sequential
  split learning): a "mean" of one model, so nothing is averaged.

Memory, in process: ONE client part, whatever N. A parallel round keeps the round's starting θ_c
and a running sum of the round's client models beside it (3 × |θ_c| in all), instead of N client
models: a client's model is needed only from the end of its step until it is added to the sum,
and the part is reset to the round's start right after. What a real SplitFed client keeps of its
own is its optimizer state (AdamW: 2 × |θ_c| per client; plain SGD: none); it is kept per client
here too, and swapped into the one optimizer for that client's step. The learning-rate schedule is
the run's, by global step, as in the plain run.

The mean is Σ models / m, summed in schedule order: for m = 1 it is the model itself, bit for bit,
and for m = 2 it is (a + b) / 2, the exact rounding of the true mean.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from hosl.models.lora import trainable_bytes
from hosl.parties.client import ClientParty


class FedAvgClients:
    """Per-client optimizer state and a parallel round's running sum, around one client part."""

    def __init__(self, party: ClientParty, n_clients: int) -> None:
        self.party = party
        self.params = [p for p in party.part.parameters() if p.requires_grad]
        self.theta_bytes = trainable_bytes(party.part)
        # each client's own optimizer state ({} until its first step); None: a stateless update
        stateful = party.optimizer is not None
        self.opt_states: list[Any] | None = (
            [defaultdict(dict) for _ in range(n_clients)] if stateful else None
        )
        self._start: list[torch.Tensor] | None = None  # the round's θ_c (parallel, mid-round)
        self._sum: list[torch.Tensor] | None = None  # Σ of the round's client models so far
        self._count = 0

    def begin(self, client: int, parallel: bool) -> None:
        """Before `client`'s step: its optimizer state in; a parallel round keeps its start."""
        if parallel and self._start is None:
            self._start = [p.detach().clone() for p in self.params]
        if self.opt_states is not None:
            self.party.optimizer.state = self.opt_states[client]  # type: ignore[union-attr]

    @torch.no_grad()
    def end(self, client: int, parallel: bool, round_ends: bool) -> None:
        """After `client`'s step: its optimizer state out; a parallel round adds the client's
        model to the sum, puts the round's start back, and averages when the round ends."""
        if self.opt_states is not None:
            self.opt_states[client] = self.party.optimizer.state  # type: ignore[union-attr]
        if not parallel:
            return
        assert self._start is not None
        if self._sum is None:
            self._sum = [p.detach().clone() for p in self.params]
        else:
            for total, p in zip(self._sum, self.params):
                total.add_(p)
        self._count += 1
        for p, start in zip(self.params, self._start):
            p.copy_(start)
        if round_ends:
            for p, total in zip(self.params, self._sum):
                p.copy_(total.div_(self._count))
            self._start, self._sum, self._count = None, None, 0

    def state_dict(self) -> dict[str, Any]:
        """Every client's optimizer state (in the optimizer's own checkpoint form) and a cut
        round's sum; the round's start is the part itself, which holds it between steps."""
        opt = self.party.optimizer
        states = []
        if opt is not None and self.opt_states is not None:
            current = opt.state
            for state in self.opt_states:
                opt.state = state
                states.append(opt.state_dict()["state"])
            opt.state = current
        return {"optimizer_states": states, "sum": self._sum or [], "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        opt = self.party.optimizer
        if opt is not None and self.opt_states is not None:
            groups = opt.state_dict()["param_groups"]
            for c, saved in enumerate(state["optimizer_states"]):
                opt.load_state_dict({"state": saved, "param_groups": groups})
                self.opt_states[c] = opt.state
        self._count = state["count"]
        self._sum = [t.clone() for t in state["sum"]] if self._count else None
        self._start = [p.detach().clone() for p in self.params] if self._count else None
