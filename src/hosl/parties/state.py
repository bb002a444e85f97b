"""Checkpointable state of a party: its parameters, optimizer and schedule, in one dict."""

from __future__ import annotations

import torch
from torch import nn


class PartyState:
    """Mixin: `state_dict`/`load_state_dict` over `part`, `optimizer` and `scheduler`."""

    part: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients, clear them, advance the schedule."""
        assert self.optimizer is not None, f"{type(self).__name__} was built without an optimizer"
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict:
        state: dict = {"part": self.part.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.part.load_state_dict(state["part"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
