"""Where hosl keeps what it downloads or converts once: models, data packs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: `$HOSL_CACHE`, else `~/.cache/hosl`. Created on first use."""
    root = os.environ.get("HOSL_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "hosl"
    path.mkdir(parents=True, exist_ok=True)
    return path
