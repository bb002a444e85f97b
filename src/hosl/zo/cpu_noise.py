"""Compiled CPU loops for the counter-based noise of `hosl.zo.seeds`, bit for bit the same values.

A ZO step regenerates z for every perturbed parameter three times (h⁺, h⁻ and the update), so at
large client dimensions noise generation is most of a step's time on a CPU. The portable path
(`seeds._normals_torch_`) runs the hash as some 25 int64 tensor operations per pass, each a trip
through memory; here the hash and the uniforms it yields are one compiled loop (numba) that keeps
each word in a register. log, sqrt, cos and sin stay with torch: its vectorised versions need not
be correctly rounded (its float32 sqrt differed in the last bit from an IEEE one on some elements),
so any other implementation would change some bits of z. What the loops compute is exact in both:

- the splitmix64 rounds, on unsigned 64-bit words (the logical shifts the tensor path emulates);
- u1 = 1 − k1·2⁻²⁴ and θ = k2·(2π·2⁻²⁴) in float32, from 24-bit integers (exactly representable;
  each a single IEEE product or exact sum, as torch computes them);
- z = r·cos θ and r·sin θ, single float32 products.

`tests/test_zo_noise.py` checks this path against the tensor path bit for bit (whole tensors of
odd and even sizes, row subsets of even and odd widths). Where numba is missing the tensor path
runs: the same values, slower.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import numpy as np
import torch

_OFF = False  # set by `tensor_path()`


@contextmanager
def tensor_path() -> Iterator[None]:
    """Within, CPU noise is made by tensor operations only: the reference the compiled loops are
    tested and benchmarked against."""
    global _OFF
    before, _OFF = _OFF, True
    try:
        yield
    finally:
        _OFF = before


@functools.cache
def loops() -> ModuleType | None:
    """The compiled loops (`hosl.zo._noise_loops`), or None where numba is not installed."""
    try:
        from hosl.zo import _noise_loops
    except ImportError:
        return None
    return _noise_loops


def normals_(words: torch.Tensor, key2: int, u1: torch.Tensor, theta: torch.Tensor,
             cos: torch.Tensor) -> bool:
    """Weyl states in `words` (int64, contiguous, n, on the CPU) → 2n standard normals, in place,
    through the float32 work buffers u1, theta, cos (n each). False (nothing done) without numba.
    """
    compiled = None if _OFF else loops()
    if compiled is None:
        return False
    compiled.uniforms(words.numpy(), np.uint64(key2 % (1 << 64)), u1.numpy(), theta.numpy())
    r = u1.log_().mul_(-2.0).sqrt_()  # torch's own log and sqrt: the tensor path's bits
    torch.cos(theta, out=cos)
    sin = theta.sin_()
    compiled.interleave(r.numpy(), cos.numpy(), sin.numpy(), words.view(torch.float32).numpy())
    return True
