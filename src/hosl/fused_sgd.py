"""Backward and update in one pass (LOMO-style SGD) for a memory-conscious first-order client.

An ordinary optimizer step needs every parameter's gradient at once: a whole copy of the client's
parameters in gradients at the end of the backward. Here each parameter is stepped as soon as its
gradient has been accumulated (`register_post_accumulate_grad_hook`) and the gradient is freed
right away, so at most the gradients of the tensors the backward is working on exist together.
Embeddings produce sparse gradients (only the looked-up rows), so no (V, d) gradient exists either.

Plain SGD only: it has no state, so the step of one tensor needs nothing but its own gradient.
`θ −= lr · (∂L/∂θ + wd · θ)`, which is `torch.optim.SGD` with `weight_decay` (tested to equal it).
Gradient accumulation is refused (a step would need every micro-batch's gradient first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class FusedSgd:
    def __init__(
        self, part: nn.Module, lr_at: Callable[[int], float], weight_decay: float = 0.0
    ) -> None:
        self.lr_at = lr_at
        self.lr = lr_at(0)
        self.weight_decay = weight_decay
        for module in part.modules():
            if isinstance(module, nn.Embedding):
                module.sparse = True  # (rows, d) gradients, never (V, d)
        self._handles = [
            p.register_post_accumulate_grad_hook(self._step)
            for p in part.parameters()
            if p.requires_grad
        ]

    def start_step(self, step: int) -> None:
        """The learning rate of `step` (the schedule is a function of the step alone)."""
        self.lr = self.lr_at(step)

    @torch.no_grad()
    def _step(self, param: torch.Tensor) -> None:
        grad = param.grad
        assert grad is not None
        if self.weight_decay:
            param.mul_(1.0 - self.lr * self.weight_decay)
        param.add_(grad, alpha=-self.lr)  # a sparse gradient adds its rows only
        param.grad = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
