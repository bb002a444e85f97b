"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a directory `checkpoints/step-<N>` holding `state.pt` (the parties' parameters,
optimizer and schedule states, written by hosl itself and read back with `weights_only=True`) and
`meta.json`. Data order and ZO seeds are functions of (seed, step), so no sampler or RNG state is
needed. `latest` names the newest complete checkpoint; a crash mid-write leaves the previous one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from hosl.errors import HoslError


def save_checkpoint(
    run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 2
) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    partial = root / f".step-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    torch.save(state, partial / "state.pt")
    (partial / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    (root / "latest.tmp").write_text(final.name)
    (root / "latest.tmp").replace(root / "latest")
    older = sorted(
        (p for p in root.glob("step-*") if p != final), key=lambda p: int(p.name.split("-")[1])
    )
    for stale in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (read from its meta.json only), or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    meta = run_dir / "checkpoints" / pointer.read_text().strip() / "meta.json"
    if not meta.is_file():
        raise HoslError(f"checkpoint {meta.parent} named by {pointer} is missing; the run cannot "
                        "resume")
    return int(json.loads(meta.read_text())["step"])


def load_latest(run_dir: Path) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, state, meta) of the newest complete checkpoint, or None if the run has none."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise HoslError(f"checkpoint {path} named by {pointer} is missing; the run cannot resume")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return int(meta["step"]), state, meta
