"""Which examples each step trains on: a pure function of (seed, step), so a resumed run sees
exactly the batches the uninterrupted run would have seen, with no sampler state to save."""

from __future__ import annotations

import torch

from hosl.zo.seeds import tensor_seed


def _epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(tensor_seed(seed, f"epoch-{epoch}"))
    return torch.randperm(num_examples, generator=gen)


def step_indices(
    num_examples: int, step: int, batch_size: int, grad_accum: int, seed: int
) -> list[list[int]]:
    """Example indices for each micro-batch of `step`: shuffled epochs, no example repeats
    within an epoch. Returns `grad_accum` lists of `batch_size` indices."""
    per_step = batch_size * grad_accum
    start = step * per_step
    cache: dict[int, torch.Tensor] = {}
    flat: list[int] = []
    for i in range(start, start + per_step):
        epoch, offset = divmod(i, num_examples)
        if epoch not in cache:
            cache[epoch] = _epoch_order(num_examples, seed, epoch)
        flat.append(int(cache[epoch][offset]))
    return [flat[m * batch_size : (m + 1) * batch_size] for m in range(grad_accum)]
