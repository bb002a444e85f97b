"""`hosl sweep SWEEP.yaml`: train many configurations, resumably, and tabulate their results.

A sweep file holds

    name: main                        # optional; default: the file's stem
    output_root: runs/sweeps/main     # optional; default runs/sweeps/<name>
    keep_checkpoints: true            # optional; false deletes a run's checkpoints once it is done
    base: ../configs/demo.yaml        # a config file (relative to this file, else to the cwd)
                                      # or an inline mapping in the config's nested form
    set: {steps: 100}                 # optional dotted overrides for every run (not in names)
    grid:                             # dotted key -> values: the cartesian product ...
      mode: [hosl, fo]
      seed: [0, 1]
    runs:                             # ... or an explicit list of dotted overrides (not both)
      - {mode: hosl, zo.q: 4}

`grid` may also be a list of such mappings: the runs are the union of their products (one grid
per mode, say, when modes need different learning rates).

Each run lives in `<output_root>/<name>`, the name made from its own overrides
(`mode=hosl,model.split_layer=4,seed=0`), so rerunning the sweep finds it again: a finished run
(summary.json) is skipped, a run with a checkpoint is resumed, anything else starts afresh. Every
configuration is validated before the first run starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hosl.config import (
    TrainConfig,
    check_split_layer,
    load_config,
    load_run_config,
    load_yaml,
    to_dict,
)
from hosl.errors import ConfigError, HoslError
from hosl.results import collect, flatten, write_results

SWEEP_KEYS = ("name", "output_root", "keep_checkpoints", "base", "set", "grid", "runs")
# What a crashed run can leave behind; anything else in its directory is not ours to delete.
# What a run writes in its directory (`clients`: a many-client run's data, written first), so a
# directory holding only these is a run this sweep may restart.
RUN_ARTEFACTS = (
    "config.yaml", "metrics.jsonl", "predictions.jsonl", "checkpoints", "error.log", "clients"
)
MAX_NAME = 100


@dataclass(frozen=True)
class PlannedRun:
    name: str
    overrides: dict[str, Any]  # this run's own dotted overrides
    config: TrainConfig
    run_dir: Path
    action: str  # run | restart | resume | extend | skip


@dataclass(frozen=True)
class SweepPlan:
    name: str
    path: Path
    output_root: Path
    swept_keys: list[str]
    keep_checkpoints: bool
    runs: list[PlannedRun]


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}".splitlines()[0]) from None


def _base_tree(spec: dict[str, Any], sweep_path: Path) -> dict[str, Any]:
    base = spec.get("base", {})
    if isinstance(base, str):
        # Relative to the sweep file first, so a study folder can be moved as a whole.
        candidates = [sweep_path.parent / base, Path(base)]
        found = next((p for p in candidates if p.is_file()), candidates[0])
        base = _read_yaml(found, f"sweep {sweep_path}: base config file")
    if not isinstance(base, dict):
        raise ConfigError(f"sweep {sweep_path}: base must be a config file path or a mapping")
    return flatten(base)


def _expand(spec: dict[str, Any], sweep_path: Path) -> list[dict[str, Any]]:
    """The sweep's list of per-run override mappings, in file order."""
    where = f"sweep {sweep_path}"
    if ("grid" in spec) == ("runs" in spec):
        raise ConfigError(f"{where}: give either grid: (key -> values) or runs: (a list), not both")
    if "runs" in spec:
        runs = spec["runs"]
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
            raise ConfigError(f"{where}: runs must be a non-empty list of key: value mappings")
        return [flatten(r) for r in runs]
    grids = spec["grid"] if isinstance(spec["grid"], list) else [spec["grid"]]
    out: list[dict[str, Any]] = []
    for grid in grids:
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{where}: grid must map dotted keys to lists of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: grid key {key} needs a non-empty list, got {values!r}")
        keys = list(grid)
        out.extend(dict(zip(keys, combo)) for combo in itertools.product(*grid.values()))
    return out


def _fmt(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return repr(value) if isinstance(value, float) else str(value)


def run_name(overrides: dict[str, Any]) -> str:
    """Directory name of a run: its overrides, sorted, so the file's key order does not matter.

    Characters a filesystem or shell could trip on become `_`; a name that had any, or is too
    long, gets a hash of the exact overrides so two runs never share a directory.
    """
    if not overrides:
        return "base"
    canonical = ",".join(f"{k}={_fmt(overrides[k])}" for k in sorted(overrides))
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", canonical)
    if safe == canonical and len(safe) <= MAX_NAME:
        return safe
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:10]
    return f"{safe[: MAX_NAME - 11]}-{digest}"


def _check_model(cfg: TrainConfig) -> None:
    """k against the model's depth, and the task name, without loading any weights."""
    from hosl.tasks import get_task

    get_task(cfg.data.task)
    if cfg.mode.endswith("-full"):
        return
    from hosl.models.configs import builtin_config, builtin_config_names
    from hosl.models.split import num_layers

    name = cfg.model.name
    if name.lower() in builtin_config_names():
        config = builtin_config(name)
    elif (Path(name).expanduser() / "config.json").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(Path(name).expanduser())
    else:
        return  # a hub id or a .gguf file: the trainer checks k once it has the model
    check_split_layer(cfg.model.split_layer, num_layers(config), name)


def _differences(saved: TrainConfig, planned: TrainConfig) -> list[str]:
    a, b = flatten(to_dict(saved)), flatten(to_dict(planned))
    return [k for k in b if k != "output" and a.get(k) != b[k]]


def _action(run_dir: Path, cfg: TrainConfig) -> str:
    """What to do with a run directory: skip, resume or extend it, or (re)start it."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "run"
    done = (run_dir / "summary.json").is_file()
    has_checkpoint = (run_dir / "checkpoints" / "latest").is_file()
    if done or has_checkpoint:
        saved = load_run_config(run_dir / "config.yaml")
        diff = _differences(saved, cfg)
        if not diff:
            return "skip" if done else "resume"
        if diff == ["steps"] and has_checkpoint and saved.steps < cfg.steps:
            return "extend"  # only steps grew: continue from the checkpoint, as train --resume
        changes = ", ".join(f"{k}" for k in diff)
        raise ConfigError(
            f"{run_dir} holds a run with a different configuration ({changes} differ); "
            "move it away or choose another --output-root"
        )
    strangers = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ARTEFACTS)
    if strangers:
        raise ConfigError(
            f"{run_dir} is not a run directory this sweep can restart (it holds "
            f"{', '.join(strangers[:3])}); move it away or choose another --output-root"
        )
    return "restart"


def plan_sweep(
    path: Path, *, output_root: Path | None = None, overrides: dict[str, Any] | None = None
) -> SweepPlan:
    """Read and validate a sweep: every run's config and directory, before anything runs.

    `overrides` (dotted keys) apply to every run on top of the base, as `--set` does for train;
    they do not enter run names, so a changed value makes a finished run a mismatch, not a skip.
    The sweep decides each run's `output`; a base that sets one is overridden.
    """
    path = Path(path)
    spec = _read_yaml(path, "sweep file")
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping (base:, grid: or runs:)")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(
            f"sweep {path}: unknown key {unknown[0]}; valid keys: {', '.join(SWEEP_KEYS)}"
        )
    name = str(spec.get("name") or path.stem)
    root = Path(output_root or spec.get("output_root") or Path("runs") / "sweeps" / name)
    keep = spec.get("keep_checkpoints", True)
    if not isinstance(keep, bool):
        raise ConfigError(f"sweep {path}: keep_checkpoints must be true or false")
    common = spec.get("set", {})
    if not isinstance(common, dict):
        raise ConfigError(f"sweep {path}: set must map dotted keys to values")
    # Command-line values arrive as text; read them as the sweep file would be read (1e-6 too).
    cli = {k: load_yaml(v) if isinstance(v, str) else v
           for k, v in (overrides or {}).items()}
    base = {**_base_tree(spec, path), **flatten(common), **cli}
    per_run = _expand(spec, path)
    runs: list[PlannedRun] = []
    seen: dict[str, int] = {}
    for index, run_overrides in enumerate(per_run, start=1):
        rname = run_name(run_overrides)
        label = f"sweep {name}: run {index} ({rname})"
        if "output" in run_overrides:
            raise ConfigError(f"{label}: output is set by the sweep; remove it from the runs")
        if rname in seen:
            raise ConfigError(f"{label} repeats run {seen[rname]}; remove one of them")
        seen[rname] = index
        run_dir = root / rname
        try:
            cfg = load_config(None, {**base, **run_overrides, "output": str(run_dir)})
            _check_model(cfg)
            action = _action(run_dir, cfg)
        except HoslError as err:
            raise type(err)(f"{label}: {err}") from None
        runs.append(PlannedRun(rname, dict(run_overrides), cfg, run_dir, action))
    swept = list(dict.fromkeys(k for r in per_run for k in r))
    return SweepPlan(name, path, root, swept, keep, runs)


def _execute(run: PlannedRun, *, progress: bool, echo: Callable[[str], None]) -> None:
    from hosl.trainer import resume_config, train

    if run.action == "restart":
        for artefact in RUN_ARTEFACTS:
            target = run.run_dir / artefact
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if run.action in ("resume", "extend"):
        train(resume_config(run.run_dir, run.config.steps), resume_dir=run.run_dir,
              progress=progress, echo=echo)
    else:
        train(run.config, progress=progress, echo=echo)
    (run.run_dir / "error.log").unlink(missing_ok=True)  # a failure this run has now got past


def run_sweep(
    path: Path,
    *,
    dry_run: bool,
    output_root: Path | None,
    echo: Callable[[str], None] = print,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (1, 1),
    table_only: bool = False,
) -> Path:
    """Plan, run what is not finished, and write results.csv / results.md; returns results.md.

    `table_only` trains nothing and writes the table of the runs finished so far: a study that
    takes several sessions can commit what it has (runs still training are left untouched).

    `shard=(i, n)` trains only runs i, i+n, i+2n, ... (1-based, in file order), so n processes
    can share one sweep without touching each other's runs; each writes the table of every run
    finished so far, and the last one to end writes the complete table.

    A run that fails is reported and the sweep goes on with the next one; the sweep then ends
    with a HoslError naming the failed runs (their tracebacks are in their error.log).
    """
    plan = plan_sweep(path, output_root=output_root, overrides=overrides)
    results_md = plan.output_root / "results.md"
    total = len(plan.runs)
    todo = sum(r.action != "skip" for r in plan.runs)
    echo(f"sweep {plan.name}: {total} runs, {todo} to train, output in {plan.output_root}")
    if table_only:
        _write_tables(plan)
        echo(f"results of {total - todo} finished runs: {results_md}")
        return results_md
    failed: list[str] = []
    index, shards = shard
    for i, run in enumerate(plan.runs, start=1):
        head = f"[{i}/{total}] {run.name}"
        if (i - 1) % shards != index - 1:
            echo(f"{head}: left to shard {(i - 1) % shards + 1}/{shards}")
            continue
        if run.action == "skip":
            echo(f"{head}: skipped, already finished (summary.json exists)")
            continue
        echo(f"{head}: {'would ' if dry_run else ''}{run.action}")
        if dry_run:
            continue
        try:
            _execute(run, progress=progress, echo=echo)
        except HoslError as err:
            failed.append(run.name)
            echo(f"{head}: failed: {err}")
        except Exception as err:  # one broken run must not cost the others their turn
            failed.append(run.name)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "error.log").write_text(traceback.format_exc())
            echo(f"{head}: failed: {type(err).__name__}: {err} (see {run.run_dir / 'error.log'})")
        else:
            if not plan.keep_checkpoints:
                # The table needs summary.json and metrics.jsonl; a checkpoint is 0.5-2 GB.
                shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)
    if dry_run:
        echo(f"dry run: nothing written; results would go to {results_md}")
        return results_md
    _write_tables(plan)
    echo(f"results: {results_md}")
    if failed:
        raise HoslError(
            f"{len(failed)} of {total} runs failed ({', '.join(failed)}); "
            f"fix the cause and rerun `hosl sweep {plan.path}` to resume them"
        )
    return results_md


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (1 <= I <= N) -> (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ConfigError(f"--shard must look like I/N with 1 <= I <= N (e.g. 1/2), got {text!r}")
    return int(match[1]), int(match[2])


def _write_tables(plan: SweepPlan) -> None:
    plan.output_root.mkdir(parents=True, exist_ok=True)
    order = {r.name: i for i, r in enumerate(plan.runs)}
    # The sweep file's order first; finished runs the file no longer names go last.
    rows = sorted(
        collect([plan.output_root]), key=lambda r: (order.get(r["run"], len(order)), r["run"])
    )
    stale = sum(r["run"] not in order for r in rows)
    note = f" ({stale} of them not in {plan.path}, listed last)" if stale else ""
    write_results(rows, plan.output_root, plan.swept_keys, f"Sweep {plan.name}", note)

