"""The numba loops of `hosl.zo.cpu_noise` (imported only through it, only where numba is)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from hosl.zo import seeds

# the tensor path's constants, as numba constants
_MIX1, _MIX2 = np.uint64(seeds._MIX1), np.uint64(seeds._MIX2)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_TOP, _MASK = np.uint64(64 - seeds._U_BITS), np.uint64(seeds._U_MASK)
_MINUS_SCALE = np.float32(-seeds._U_SCALE)
_ONE = np.float32(1.0)
_TURN = np.float32(seeds._THETA_SCALE)  # the float32 torch multiplies θ's integer by

def _jit(func: Callable[..., Any]) -> Callable[..., Any]:
    """Compiled once per installation where numba can cache (the package's folder or a user
    cache directory is writable), else once per process."""
    try:
        return numba.njit(cache=True, nogil=True)(func)
    except RuntimeError:  # numba found nowhere to write its cache
        return numba.njit(nogil=True)(func)


@_jit
def uniforms(words: Any, key2: Any, u1: Any, theta: Any) -> None:
    """Weyl states (int64) → h = mix(mix(state) ^ key2) → u1 and θ (float32), per pair."""
    states = words.view(np.uint64)
    for j in range(states.shape[0]):
        x = states[j]
        x ^= x >> _S30
        x *= _MIX1
        x ^= x >> _S27
        x *= _MIX2
        x ^= x >> _S31
        x ^= key2
        x ^= x >> _S30
        x *= _MIX1
        x ^= x >> _S27
        x *= _MIX2
        x ^= x >> _S31
        u1[j] = np.float32((x >> _TOP) & _MASK) * _MINUS_SCALE + _ONE
        theta[j] = np.float32(x & _MASK) * _TURN


@_jit
def interleave(r: Any, cos: Any, sin: Any, out: Any) -> None:
    """out[2j], out[2j + 1] = r·cos θ, r·sin θ (float32 products)."""
    for j in range(r.shape[0]):
        out[2 * j] = r[j] * cos[j]
        out[2 * j + 1] = r[j] * sin[j]
