"""Seeded, disjoint train/dev/test samples, drawn the way MeZO draws them.

MeZO samples its 1000 training examples as the first 1000 indices of
``numpy.random.RandomState(seed).permutation(len(pool))``. hosl keeps that exact permutation (the
legacy RandomState stream is frozen by numpy's compatibility policy), so with the same seed the
train sample of a hub task is MeZO's. Splits that share one pool are fixed blocks of that one
permutation:

    pool (one seeded permutation)   [ train ............................ | dev | test ]
                                      head: whatever the reserved tail leaves    tail blocks

`train` is the head, the reserved blocks are cut from the tail in a fixed order, and a request for
n examples takes the first n of its block. A block therefore depends only on (pool size, seed,
reserved sizes), never on how many examples another split asked for or on the order of calls, and
blocks never overlap. For the `rt` pack the tail holds test (1000) then dev (500); for hub tasks
the pool is the hub's train split with a dev block of `Task.dev_size`, and test is the hub's
validation split, permuted with the same seed.

`n`: None asks for the split's default (1000 train, 500 dev, 1000 test, as in MeZO), `ALL` (-1)
for the whole block, any n >= 0 for the first n. Asking for more than a block holds returns the
whole block; an explicit request that falls short is logged as a warning. Samples are drawn
uniformly, not balanced by label: balancing would change the label prior the model sees and
MeZO does not balance either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from hosl.errors import ConfigError, DataError

ALL = -1
"""Pass as `n` to ask for a whole split instead of a sample."""

SPLITS = ("train", "dev", "test")
DEFAULT_SIZES = MappingProxyType({"train": 1000, "dev": 500, "test": 1000})

_log = logging.getLogger(__name__)
T = TypeVar("T")


def check_request(split: str, n: int | None, seed: int) -> None:
    """Reject a split name, size or seed that no source could serve."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < ALL):
        raise ConfigError(f"n={n!r} is not a sample size; use an int >= 0, ALL (-1) or None")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r} must be an int in [0, 2**32)")


def permutation(size: int, seed: int) -> list[int]:
    """MeZO's seeded permutation of range(size); pure, so the order of calls never matters."""
    return np.random.RandomState(seed).permutation(size).tolist()


def block(size: int, seed: int, split: str, reserved: Sequence[tuple[str, int]]) -> list[int]:
    """The indices of `split` in a pool of `size` rows; see the module docstring for the layout.

    `reserved` lists (split, block size) pairs cut from the tail in that order; every other split
    name gets the head. A pool too small to leave at least one row for the head is an error.
    """
    order = permutation(size, seed)
    end = size
    for name, count in reserved:
        start = end - count
        if start < 1:
            wanted = " + ".join(f"{c} {n}" for n, c in reserved)
            raise DataError(f"a pool of {size} rows cannot hold {wanted} rows and a train split")
        if name == split:
            return order[start:end]
        end = start
    return order[:end]


def take(items: Sequence[T], n: int | None, split: str, what: str) -> list[T]:
    """The first n of `items` (already in seeded order); `what` names the source in warnings."""
    if n == ALL:
        return list(items)
    wanted = DEFAULT_SIZES[split] if n is None else n
    if wanted > len(items) and n is not None:
        _log.warning(
            "asked for %d %s examples of %s, which has %d; using all %d",
            wanted, split, what, len(items), len(items),
        )
    return list(items[:wanted])


def sample_file(items: Sequence[T], n: int | None, seed: int) -> list[T]:
    """A user's file: every row in file order for None or ALL, else n rows in seeded order."""
    if n is None or n == ALL:
        return list(items)
    order = permutation(len(items), seed)
    if n > len(items):
        _log.warning("asked for %d examples of a file with %d rows; using all", n, len(items))
    return [items[i] for i in order[:n]]
