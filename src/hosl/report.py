"""`hosl report RUN_DIR...`: plots and a markdown index for a set of runs.

    loss_vs_step.png              training loss per configuration (from metrics.jsonl)
    accuracy_vs_step.png          evaluation accuracy per configuration, zero-shot at step 0
    accuracy_vs_split_layer.png   final accuracy against k (unsplit modes: dashed lines)
    client_memory_vs_split_layer.png   the client's measured peak against k
    accuracy_vs_client_params.png final accuracy against d_c, the client's parameter count
    accuracy_vs_q.png             final accuracy against Q (modes with a ZO part)
    seconds_per_step_vs_q.png     wall time per step against Q

A plot against a quantity is drawn only when the runs hold at least two values of it; report.md
lists the plots drawn and says why the others were not. A series is one configuration (the keys
that differ between the runs, seed aside); its seeds are averaged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hosl.config import MODES, SPLIT_MODES, ZO_MODES, TrainConfig, to_dict
from hosl.errors import HoslError
from hosl.plots import Curve, Points, Reference, plot_curves, plot_points
from hosl.results import effective, flatten, markdown_table, read_run

CONFIG_KEYS = tuple(flatten(to_dict(TrainConfig())))
NOT_A_VARIANT = ("seed", "output")  # seeds are averaged; output differs by construction
SHORT = {"model.split_layer": "k", "zo.q": "Q", "zo.lr": "ZO lr", "zo.eps": "eps",
         "optim.lr": "FO lr", "model.name": "model", "data.task": "task"}


@dataclass
class RunRecord:
    path: Path
    row: dict[str, Any]  # effective config + summary (see hosl.results)
    losses: list[tuple[int, float]]
    evals: list[tuple[int, float]]

    @property
    def finished(self) -> bool:
        return self.row.get("eval_accuracy") is not None


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run directories (holding config.yaml) given directly or anywhere under the given folders."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.rglob("config.yaml")))
        else:
            raise HoslError(f"{path}: no such run directory")
    return list(dict.fromkeys(found))


def default_out(run_dirs: Sequence[Path]) -> Path:
    """`<the folder that holds the runs>/report` (a sweep's root for a sweep's runs);
    `<run>/report` for a single run."""
    if len(run_dirs) <= 1:
        return (Path(run_dirs[0]) if run_dirs else Path()) / "report"
    parents = [str(Path(p).resolve().parent) for p in run_dirs]
    return Path(os.path.commonpath(parents)) / "report"


def load_record(run_dir: Path) -> RunRecord:
    row = effective(read_run(run_dir))
    losses: dict[int, float] = {}
    evals: dict[int, float] = {}
    if row.get("zero_shot_accuracy") is not None:
        evals[0] = float(row["zero_shot_accuracy"])
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            # A resumed run logs again the steps after its checkpoint: the later line wins.
            if "loss" in record:
                losses[int(record["step"])] = float(record["loss"])
            if "eval_accuracy" in record:
                evals[int(record["step"])] = float(record["eval_accuracy"])
    return RunRecord(run_dir, row, sorted(losses.items()), sorted(evals.items()))


def _sort_key(value: Any) -> tuple:
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _varying(rows: Sequence[dict[str, Any]], exclude: Sequence[str]) -> list[str]:
    """Config keys with two or more values among the runs that use them (None: unused)."""
    keys = [k for k in CONFIG_KEYS if k not in NOT_A_VARIANT and k not in exclude]
    return [
        k for k in keys if len({json.dumps(r.get(k)) for r in rows if r.get(k) is not None}) > 1
    ]


def _variant(row: dict[str, Any], keys: Sequence[str]) -> tuple:
    mode_rank = MODES.index(row["mode"]) if row.get("mode") in MODES else len(MODES)
    return (mode_rank, *(_sort_key(row.get(k)) for k in keys))


def _label(row: dict[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        value = row.get(key)
        if value is None:
            continue  # a key this mode does not use
        if key == "mode":
            parts.append(str(value))
            continue
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{SHORT.get(key, key)}={Path(text).name if '/' in text else text}")
    return ", ".join(parts) or str(row.get("mode"))


def _group(records: Sequence[RunRecord], keys: Sequence[str]) -> list[list[RunRecord]]:
    groups: dict[tuple, list[RunRecord]] = {}
    for rec in records:
        groups.setdefault(_variant(rec.row, keys), []).append(rec)
    return [groups[k] for k in sorted(groups)]


def _curves(records: Sequence[RunRecord], attr: str) -> list[Curve]:
    keys = _varying([r.row for r in records], ())
    return [
        Curve(_label(g[0].row, keys), [getattr(r, attr) for r in g])
        for g in _group(records, keys)
    ]


def _points(records: Sequence[RunRecord], x: str, y: str, exclude: Sequence[str]) -> list[Points]:
    keys = _varying([r.row for r in records], exclude)
    series = []
    for group in _group(records, keys):
        points = Points(_label(group[0].row, keys))
        for rec in group:
            if rec.row.get(x) is not None and rec.row.get(y) is not None:
                points.values.setdefault(float(rec.row[x]), []).append(float(rec.row[y]))
        if points.values:
            series.append(points)
    return series


def _references(records: Sequence[RunRecord], y: str, exclude: Sequence[str]) -> list[Reference]:
    keys = _varying([r.row for r in records], exclude)
    refs = []
    for group in _group(records, keys):
        values = [float(r.row[y]) for r in group if r.row.get(y) is not None]
        if values:
            refs.append(Reference(_label(group[0].row, keys) + " (unsplit)", values))
    return refs


def make_report(run_dirs: list[Path], out: Path) -> list[Path]:
    """Write the plots the runs support and out/report.md; returns the PNGs written."""
    records, duplicates = _distinct([load_record(p) for p in find_runs(run_dirs)])
    if not records:
        raise HoslError(
            f"no run directories (with config.yaml) in {', '.join(map(str, run_dirs))}"
        )
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []

    def attempt(title: str, reason: str | None, draw: Callable[[], Path]) -> None:
        if reason:
            skipped.append((title, reason))
        else:
            written.append((title, draw()))

    logged = [r for r in records if len(r.losses) >= 2]
    attempt("Training loss against step", None if logged else "no run logged two losses",
            lambda: plot_curves(_curves(logged, "losses"), title="Training loss",
                                ylabel="loss (cross-entropy over candidates)",
                                path=out / "loss_vs_step.png", smooth=True))
    evaluated = [r for r in records if len(r.evals) >= 2]
    attempt("Evaluation accuracy against step",
            None if evaluated else "no run has two evaluations",
            lambda: plot_curves(_curves(evaluated, "evals"), title="Evaluation accuracy",
                                ylabel="accuracy (%)", path=out / "accuracy_vs_step.png",
                                scale=100.0))

    done = [r for r in records if r.finished]
    split = [r for r in done if r.row.get("mode") in SPLIT_MODES]
    unsplit = [r for r in done if r.row.get("mode") not in SPLIT_MODES]
    ks = {r.row.get("model.split_layer") for r in split}
    k_reason = None if len(ks) > 1 else f"the split runs have one split layer ({_one(ks)})"
    no_k = ("model.split_layer",)
    attempt("Accuracy against split layer k", k_reason,
            lambda: plot_points(_points(split, "model.split_layer", "eval_accuracy", no_k),
                                references=_references(unsplit, "eval_accuracy", no_k),
                                title="Final accuracy against the split layer",
                                xlabel="split layer k (client blocks)", ylabel="accuracy (%)",
                                scale=100.0, integer_x=True,
                                path=out / "accuracy_vs_split_layer.png"))
    attempt("Client peak memory against split layer k", k_reason,
            lambda: plot_points(_points(split, "model.split_layer", "client_peak_bytes", no_k),
                                title="Client peak memory (live tensor bytes) against k",
                                xlabel="split layer k (client blocks)",
                                ylabel="client peak (MiB)", scale=1 / 2**20, integer_x=True,
                                path=out / "client_memory_vs_split_layer.png"))
    dcs = {r.row.get("client_params") for r in split} - {None}
    attempt("Accuracy against client dimension d_c",
            None if len(dcs) > 1 else f"the split runs have one client size ({_one(dcs)})",
            lambda: plot_points(_points(split, "client_params", "eval_accuracy", no_k),
                                references=_references(unsplit, "eval_accuracy", no_k),
                                title="Final accuracy against the client's parameter count",
                                xlabel="client parameters d_c (millions)",
                                ylabel="accuracy (%)", scale=100.0, xscale=1e-6,
                                path=out / "accuracy_vs_client_params.png"))
    zo_runs = [r for r in done if r.row.get("mode") in ZO_MODES]
    qs = {r.row.get("zo.q") for r in zo_runs}
    q_reason = None if len(qs) > 1 else f"the ZO runs have one Q ({_one(qs)})"
    for metric, name, ylabel, scale in (
        ("eval_accuracy", "accuracy", "accuracy (%)", 100.0),
        ("seconds_per_step", "seconds_per_step", "seconds per step (s)", 1.0),
    ):
        attempt(f"{ylabel.split(' (')[0].capitalize()} against Q", q_reason,
                lambda m=metric, n=name, yl=ylabel, s=scale: plot_points(
                    _points(zo_runs, "zo.q", m, ("zo.q",)),
                    title=f"{yl.split(' (')[0].capitalize()} against the perturbation pairs Q",
                    xlabel="Q (perturbation pairs per step)", ylabel=yl, scale=s,
                    log2_x=True, path=out / f"{n}_vs_q.png"))
    _write_index(out, records, written, skipped, duplicates)
    return [path for _, path in written]


def _distinct(records: list[RunRecord]) -> tuple[list[RunRecord], list[Path]]:
    """Drop runs whose configuration, seed included, repeats an earlier one.

    Two sweeps can hold the same run (main.yaml's hosl seed 0 is split_layer.yaml's k = 4):
    averaging both would count one seed twice.
    """
    seen: set[str] = set()
    kept, dropped = [], []
    for rec in records:
        key = json.dumps([rec.row.get(k) for k in CONFIG_KEYS if k != "output"])
        if key in seen:
            dropped.append(rec.path)
        else:
            seen.add(key)
            kept.append(rec)
    return kept, dropped


def _one(values: set) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


def _write_index(
    out: Path, records: Sequence[RunRecord], written: Sequence[tuple[str, Path]],
    skipped: Sequence[tuple[str, str]], duplicates: Sequence[Path],
) -> Path:
    columns = ["run", "mode", "split_layer", "q", "seed", "steps", "eval_accuracy",
               "zero_shot_accuracy", "client_params", "client_peak_bytes", "seconds_per_step"]
    lines = [f"# hosl report: {len(records)} runs", "", markdown_table([r.row for r in records],
                                                                         columns), "## Plots", ""]
    for title, path in written:
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    if skipped:
        lines += ["## Not drawn", ""] + [f"- {title}: {reason}" for title, reason in skipped]
    if duplicates:
        lines += ["", "## Left out", "", "Same configuration and seed as a run above:", ""]
        lines += [f"- {path}" for path in duplicates]
    index = out / "report.md"
    index.write_text("\n".join(lines).rstrip("\n") + "\n")
    return index
