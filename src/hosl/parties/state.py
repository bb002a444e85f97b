"""What every party has: checkpointable state (parameters, optimizer, schedule) and a memory
meter that measures the party's own bytes phase by phase."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from hosl.errors import Diverged
from hosl.memory.measure import PartyMeter
from hosl.models.lora import load_trained_state, trained_state


class PartyState:
    """Mixin over `part`, `optimizer` and `scheduler`: checkpoints, optimizer steps, metering."""

    part: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    meter: PartyMeter | None = None

    def start_metering(self, name: str) -> PartyMeter:
        """Measure this party from now on: resident state plus everything its phases allocate."""
        device = next(self.part.parameters()).device
        self.meter = PartyMeter(name, device)
        self.meter.set_resident_state(self.part, self.optimizer)
        return self.meter

    def stop_metering(self) -> None:
        """Keep the peaks measured so far but stop tracking (tracking costs time on every op)."""
        self.metering_paused = True

    def phase(self, name: str) -> AbstractContextManager:
        if self.meter is None or getattr(self, "metering_paused", False):
            return nullcontext()
        return self.meter.phase(name)

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients, clear them, advance the schedule."""
        assert self.optimizer is not None, f"{type(self).__name__} was built without an optimizer"
        grads = [p.grad for p in self.part.parameters() if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.optimizer.zero_grad(set_to_none=True)
            raise Diverged(f"the {type(self).__name__.removesuffix('Party').lower() or 'model'}'s "
                           "gradient is not finite: the update was not applied")
        with self.phase("update"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.meter is not None and not getattr(self, "metering_paused", False):
            # optimizer state now exists for good: count it as resident, not transient
            self.meter.set_resident_state(self.part, self.optimizer)

    def state_dict(self) -> dict:
        # the tensors that train alone (see `trained_state`): an adapter's frozen base, or a
        # frozen client's whole part, is the pretrained model's
        state: dict = {"part": trained_state(self.part)}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        who = {"ClientParty": "client", "ServerParty": "server"}.get(type(self).__name__, "model")
        load_trained_state(self.part, state["part"], who)
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
