"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a directory `checkpoints/step-<N>`:

    <party>.safetensors   one per party (`client`, `server`; `full` for an unsplit run): the
                          tensors the party trains (`requires_grad`) and nothing else. A party
                          that trains its whole part keeps it whole; one with adapters keeps its
                          adapters alone; one that trains nothing (a `frozen` client) keeps no
                          tensor. What is not kept is the pretrained model's: it is rebuilt from
                          it at resume, eval and export. (Checkpoints written before a frozen
                          client stored nothing hold its whole part, and are still read.)
    training_state.pt     the rest, small: optimizer moments (of the trained tensors only: an
                          optimizer is built over them alone), schedules, many clients' update log
                          (written by hosl itself, read back with `weights_only=True`)
    meta.json             the step and what the writer records beside it

Data order and ZO seeds are functions of (seed, step), so no sampler or RNG state is needed.
`latest` names the newest complete checkpoint; a crash mid-write leaves the previous one.

The state a run hands over is `{party: {"part": {name: tensor}, ...}, ...}` (see
`hosl.parties.state`): each party's `part` goes to its safetensors file under the part's own
parameter names, everything else to `training_state.pt`, and `read_checkpoint` puts the two back
together. Tensors a part holds twice (an unsplit model's tied embedding and head) are written once;
the file's metadata names the other names (`aliases`).

A checkpoint of an earlier layout (one `state.pt` holding everything) is still read: a run that
wrote one resumes, evaluates and exports as before, and its next checkpoint has this layout.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hosl.errors import HoslError

TRAINING_STATE = "training_state.pt"
PARAMETERS_SUFFIX = ".safetensors"
LEGACY_STATE = "state.pt"  # the earlier layout: the whole state in one torch.save file
_PARTIES = "_parameter_files"  # training_state.pt's list of the parties written as safetensors


def save_checkpoint(
    run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 2
) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    partial = root / f".step-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    write_checkpoint(partial, state)
    (partial / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    # Saving a step again (a server's last save of a session, then its next) replaces step-N.
    # `latest` may name step-N all along, so the old one steps aside rather than being deleted:
    # a crash between the two renames leaves it where the readers look (`_resolve`).
    aside = _aside(final)
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        final.rename(aside)
    partial.rename(final)
    (root / "latest.tmp").write_text(final.name)
    (root / "latest.tmp").replace(root / "latest")
    older = sorted(
        (p for p in root.glob("step-*") if p != final), key=lambda p: int(p.name.split("-")[1])
    )
    for stale in [*older[: max(0, len(older) - (keep - 1))], *root.glob(".step-*.old")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _resolve(pointer: Path) -> Path:
    """The checkpoint directory `latest` names, or the copy it stepped aside to when a save of the
    same step was interrupted between its renames."""
    path = pointer.parent / pointer.read_text().strip()
    if not is_checkpoint(path) and is_checkpoint(_aside(path)):
        return _aside(path)
    return path


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` into the directory `path`: parties' parameters as safetensors, the rest
    with torch.save."""
    rest: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict) and isinstance(value.get("part"), dict):
            tensors, aliases = _stored_once(value["part"])
            save_file(tensors, path / f"{key}{PARAMETERS_SUFFIX}",
                      metadata={"party": key, "aliases": json.dumps(aliases)})
            rest[key] = {k: v for k, v in value.items() if k != "part"}
        else:
            rest[key] = value
    # which parties have a parameter file: reading finds a missing one instead of a party without
    rest[_PARTIES] = [k for k, v in state.items() if isinstance(v, dict) and "part" in v]
    torch.save(rest, path / TRAINING_STATE)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state `write_checkpoint` wrote into `path` (or an earlier layout's `state.pt`)."""
    if (path / TRAINING_STATE).is_file():
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
        for party in state.pop(_PARTIES):
            file = path / f"{party}{PARAMETERS_SUFFIX}"
            if not file.is_file():
                raise HoslError(f"checkpoint {path} lacks {file.name}; the run cannot resume from "
                                "it (an older checkpoint of the run may be complete)")
            state[party] = {"part": _read_parameters(file), **state[party]}
        return state
    if (path / LEGACY_STATE).is_file():
        return torch.load(path / LEGACY_STATE, map_location="cpu", weights_only=True)
    raise HoslError(f"checkpoint {path} is missing or incomplete; the run cannot resume from it")


def is_checkpoint(path: Path) -> bool:
    """True for a complete checkpoint directory (of either layout)."""
    return (path / "meta.json").is_file() and (
        (path / TRAINING_STATE).is_file() or (path / LEGACY_STATE).is_file()
    )


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (read from its meta.json only), or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    meta = _resolve(pointer) / "meta.json"
    if not meta.is_file():
        raise HoslError(f"checkpoint {meta.parent} named by {pointer} is missing; the run cannot "
                        "resume")
    return int(json.loads(meta.read_text())["step"])


def load_latest(run_dir: Path) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, state, meta) of the newest complete checkpoint, or None if the run has none."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = _resolve(pointer)
    if not is_checkpoint(path):
        raise HoslError(f"checkpoint {path} named by {pointer} is missing; the run cannot resume")
    state = read_checkpoint(path)
    meta = json.loads((path / "meta.json").read_text())
    return int(meta["step"]), state, meta


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The directory of the newest complete checkpoint, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = _resolve(pointer)
    return path if is_checkpoint(path) else None


def parameter_count(path: Path, party: str) -> int | None:
    """Floating-point parameters `party` stored in the checkpoint `path` (each tensor once), read
    from the safetensors header alone; None when the checkpoint holds no such party."""
    file = path / f"{party}{PARAMETERS_SUFFIX}"
    if file.is_file():
        with safe_open(file, framework="pt") as handle:
            total = 0
            for name in handle.keys():  # noqa: SIM118 - safe_open is no mapping
                piece = handle.get_slice(name)
                if piece.get_dtype().startswith(("F", "BF")):
                    total += math.prod(piece.get_shape())
            return total
    if (path / LEGACY_STATE).is_file() and not (path / TRAINING_STATE).is_file():
        # memory-mapped: counting reads the index, not the weights
        state = torch.load(path / LEGACY_STATE, map_location="cpu", weights_only=True, mmap=True)
        part = state.get(party, {}).get("part")
        if part is None:
            return None
        # Tied or shared tensors are one parameter: count each storage region once.
        seen = {
            (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()): t.numel()
            for t in part.values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        }
        return sum(seen.values())
    return None


def _stored_once(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, {alias: written name}): a tensor held under two names (tied weights)
    is written once; safetensors refuses tensors that share memory."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
                tensor.dtype)
        if view in first:
            aliases[name] = first[view]
            continue
        first[view] = name
        # a view into storage already written (no part has one today) is written as a copy
        shared = storage in storages and tensor.numel() > 0
        storages.add(storage)
        tensor = tensor.to("cpu").contiguous()
        kept[name] = tensor.clone() if shared else tensor
    return kept, aliases


def _read_parameters(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(file, framework="pt", device="cpu") as handle:  # one read: tensors and names
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors
