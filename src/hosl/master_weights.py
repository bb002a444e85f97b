"""Float32 master weights for a first-order party whose parameters are stored in bf16.

An optimizer stepping bf16 parameters directly loses every update smaller than half a bf16 step
(about 0.4% of the weight): at fine-tuning rates most of them, silently. The classic remedy, and
what GPU users expect of `--dtype bfloat16`: the party computes forward and backward in bf16,
while the optimizer keeps a float32 copy of each parameter, steps that copy with the float32
gradient, and writes the result back into the bf16 parameter. Optimizer state is float32 too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class MasterWeights(torch.optim.Optimizer):
    """Wraps the optimizer `make_inner` builds over float32 copies of `params`.

    The wrapper shares the inner optimizer's parameter groups, so a learning-rate scheduler
    built on it drives the inner step. `master_weights` (the float32 copies) is what a memory
    meter adds to the optimizer's state.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        make_inner: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.master_weights = [p.detach().float().requires_grad_(True) for p in self.params]
        self.inner = make_inner(self.master_weights)
        super().__init__(self.master_weights, dict(self.inner.defaults))
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for param, master in zip(self.params, self.master_weights):
            # the bf16 gradient is freed as its float32 copy is made: one copy alive per tensor
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None
        self.inner.step()
        for param, master in zip(self.params, self.master_weights):
            param.copy_(master)  # rounded to nearest: the master keeps what bf16 cannot hold
            master.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "master_weights": list(self.master_weights)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        with torch.no_grad():
            for master, saved in zip(self.master_weights, state_dict["master_weights"]):
                master.copy_(saved)
