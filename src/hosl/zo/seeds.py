"""Seeds and noise: every perturbation direction z is a pure function of (seed, parameter name).

One generator per (perturbation seed, tensor) means each tensor's noise can be regenerated on its
own, in any order, on either side of the split. A ZO update is therefore fully described by
(step, [(seed, projected_gradient)]): a few bytes to checkpoint, replay or send to other clients.
"""

from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1


def _hash(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def perturbation_seed(run_seed: int, step: int, micro_batch: int, q: int) -> int:
    """Seed of perturbation q at (step, micro-batch): deterministic, so a resume replays it."""
    return _hash("perturbation", run_seed, step, micro_batch, q)


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed for one named tensor under one perturbation seed."""
    return _hash("tensor", seed, name)


def noise_for(param: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """z ~ N(0, I) shaped like `param`, drawn from a fresh generator seeded by (seed, name).

    The noise is drawn in float32 and cast, so bf16 and fp32 copies of a model see the same
    direction up to rounding.
    """
    gen = torch.Generator(device=param.device)
    gen.manual_seed(tensor_seed(seed, name))
    z = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
    return z if param.dtype == torch.float32 else z.to(param.dtype)
