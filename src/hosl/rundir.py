"""Run directories: a fresh, unique default name, and a refusal to write into a used one."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from hosl.errors import ConfigError


def stamp() -> str:
    """The date and time a default directory name carries: 20250101-120000."""
    return time.strftime("%Y%m%d-%H%M%S")


def claim_dir(root: Path, name: str) -> Path:
    """Create `root/name` (or `name-2`, `name-3`, ... if taken) and return it.

    The directory is created atomically (`mkdir` without `exist_ok`), so two processes that start
    in the same second never share one.
    """
    root.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = root / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def check_empty(path: Path, what: str = "run directory") -> Path:
    """`path` if it is absent or empty; otherwise a one-line error that says how to go on."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(
            f"{what} {path} is not empty; continue it with --resume {path} or choose "
            "another --output"
        )
    return path
