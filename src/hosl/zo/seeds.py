"""Seeds and noise: every perturbation direction z is a pure function of (seed, parameter name).

One generator per (perturbation seed, tensor) means each tensor's noise can be regenerated on its
own, in any order, on either side of the split. A ZO update is therefore fully described by
(step, [(seed, projected_gradient)]): a few bytes to checkpoint, replay or send to other clients.
"""

from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1
# Row r of a row-wise tensor is seeded with tensor_seed + r * stride. Torch's CPU generator keeps
# only the low 32 bits of a seed; an odd stride is a bijection modulo 2**32, so no two rows of
# one tensor (up to 2**32 rows) ever share a stream.
_ROW_STRIDE = 0x9E3779B97F4A7C15
# Rows of a row-wise tensor are regenerated in chunks of about this many elements (4 MB fp32).
ROW_CHUNK_ELEMENTS = 1 << 20


def _hash(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def perturbation_seed(run_seed: int, step: int, micro_batch: int, q: int) -> int:
    """Seed of perturbation q at (step, micro-batch): deterministic, so a resume replays it."""
    return _hash("perturbation", run_seed, step, micro_batch, q)


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed for one named tensor under one perturbation seed."""
    return _hash("tensor", seed, name)


def noise_for(param: torch.Tensor, seed: int, name: str, row_wise: bool = False) -> torch.Tensor:
    """z ~ N(0, I) shaped like `param`, drawn from a fresh generator seeded by (seed, name).

    The noise is drawn in float32 and cast, so bf16 and fp32 copies of a model see the same
    direction up to rounding. `row_wise` tensors (embedding matrices) draw each row from its own
    generator instead, so that any subset of rows can be regenerated alone (`row_noise`).
    """
    if row_wise:
        return row_noise(param, seed, name, range(param.shape[0]))
    gen = torch.Generator(device=param.device)
    gen.manual_seed(tensor_seed(seed, name))
    z = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
    return z if param.dtype == torch.float32 else z.to(param.dtype)


def row_noise(
    param: torch.Tensor, seed: int, name: str, rows: torch.Tensor | range
) -> torch.Tensor:
    """Rows `rows` of a row-wise tensor's z: shape (len(rows), *param.shape[1:]), param's dtype.

    Row r is the same whichever other rows are drawn with it, so a forward can generate only the
    rows it looks up, and the update can walk the whole matrix in small chunks.
    """
    base = tensor_seed(seed, name)
    gen = torch.Generator(device=param.device)
    out = torch.empty((len(rows), *param.shape[1:]), dtype=torch.float32, device=param.device)
    for i, row in enumerate(rows.tolist() if isinstance(rows, torch.Tensor) else rows):
        gen.manual_seed((base + row * _ROW_STRIDE) & _MASK63)
        torch.randn(param.shape[1:], generator=gen, out=out[i])
    return out if param.dtype == torch.float32 else out.to(param.dtype)
