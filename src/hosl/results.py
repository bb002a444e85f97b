"""Run results as table rows: collect summary.json files, aggregate over seeds, write tables.

A row is one run: its resolved configuration flattened to dotted keys (`model.split_layer`,
`zo.lr`, ...), the scalar fields of its summary.json (`eval_accuracy`, `client_peak_bytes`, ...),
`run` (the directory's name), `run_dir` and `client_params` (the client part's parameters; None
for the unsplit modes; `client_trainable_params`, from summary.json, is d_c: what the client
trains, its adapters alone with `client.adapter lora`). `hosl sweep` writes `results.csv` and
`results.md` from these rows; `hosl report` plots them.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from hosl.config import SPLIT_MODES

# The columns every results table starts with (the README's tables are built from them).
COLUMNS = (
    "run", "mode", "model", "task", "split_layer", "q", "seed", "steps", "eval_accuracy",
    "zero_shot_accuracy", "client_params", "client_trainable_params", "client_peak_bytes",
    "server_peak_bytes", "wire_bytes", "round_trips", "seconds_per_step", "wall_seconds",
)
# Swept dotted keys that already have a column of their own under a shorter name.
ALIASES = {
    "mode": "mode", "model.name": "model", "data.task": "task", "model.split_layer": "split_layer",
    "zo.q": "q", "seed": "seed", "steps": "steps",
}
METRICS = (
    "eval_accuracy", "zero_shot_accuracy", "final_loss", "client_peak_bytes", "server_peak_bytes",
    "wire_bytes", "round_trips", "seconds_per_step",
)
# Config keys a mode never reads. Blanking them keeps an unused value (the base's zo.lr in an
# `fo` run, say) from looking like a difference between runs in plots and labels.
_ZO_KEYS = ("zo.q", "zo.eps", "zo.lr", "zo.estimator", "zo.embedding_noise")
_FO_KEYS = ("optim.optimizer", "optim.lr", "optim.momentum", "optim.weight_decay")
_CLIENT_KEYS = ("client.optimizer", "client.lr", "client.checkpointing", "client.fused_update")
_LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
_CLIENT_ADAPTER = ("client.adapter", *(f"client.{f}" for f in _LORA_FIELDS))
_SERVER_KEYS = ("server.adapter", *(f"server.{f}" for f in _LORA_FIELDS), "server.checkpointing")
UNUSED_KEYS: dict[str, tuple[str, ...]] = {
    "hosl": _CLIENT_KEYS,
    "fo": _ZO_KEYS,
    # a ZO server runs no backward: nothing to recompute
    "zo": (*_FO_KEYS, "zo.estimator", "zo.embedding_noise", *_CLIENT_KEYS,
           "server.checkpointing"),
    "frozen": (*_ZO_KEYS, *_CLIENT_KEYS, *_CLIENT_ADAPTER),  # its client never trains
    "fo-full": (*_ZO_KEYS, "model.split_layer", *_CLIENT_KEYS, *_SERVER_KEYS),  # one party
    "zo-full": (*_FO_KEYS, "model.split_layer", "zo.estimator", "zo.embedding_noise",
                *_CLIENT_KEYS, *_SERVER_KEYS),
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"name": "x"}} -> {"model.name": "x"}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def effective(row: dict[str, Any]) -> dict[str, Any]:
    """The row with the config keys its run never reads set to None."""
    out = dict(row)
    for key in (*UNUSED_KEYS.get(str(row.get("mode")), ()), *_unused_in_row(row)):
        if key in out:
            out[key] = None
    return out


def _unused_in_row(row: dict[str, Any]) -> list[str]:
    """Keys another key of the row switches off: a party's lora_* unless its adapter is lora,
    the clients.* settings of a run with one client."""
    unused: list[str] = []
    for party in ("client", "server"):
        if row.get(f"{party}.adapter", "lora") != "lora":
            unused += [f"{party}.{field}" for field in _LORA_FIELDS]
    if row.get("clients.n", 2) == 1:
        unused += ["clients.partition", "clients.schedule", "clients.order", "clients.fraction"]
    return unused


def read_run(run_dir: Path) -> dict[str, Any]:
    """One run directory as a row; a run still going (no summary.json) gives its config only."""
    row: dict[str, Any] = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        row.update(flatten(yaml.safe_load(config_path.read_text()) or {}))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    # Nested summary fields (per-phase peaks) do not fit a table; the JSON keeps them.
    row.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    row["model"] = summary.get("model", row.get("model.name"))
    row["task"] = summary.get("task", row.get("data.task"))
    if "split_layer" not in summary:
        full = str(row.get("mode", "")).endswith("-full")
        row["split_layer"] = None if full else row.get("model.split_layer")
    row.setdefault("q", row.get("zo.q"))
    row["run"] = run_dir.name
    row["run_dir"] = str(run_dir)
    if row.get("client_params") is None:
        row["client_params"] = client_params(run_dir, row)
    return row


def collect(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Rows of every finished run (a directory with summary.json) at or under `paths`."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file() and path.name == "summary.json":
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("summary.json")))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [read_run(p.parent) for p in unique]


def client_params(run_dir: Path, row: dict[str, Any]) -> int | None:
    """d_c: parameters of the client part, from the newest checkpoint, else from the model config.

    Unsplit modes have no client and give None. Counting reads only the checkpoint's index
    (the safetensors header), not its weights.
    """
    if row.get("mode") not in SPLIT_MODES:
        return None
    from hosl.checkpoint import latest_checkpoint, parameter_count  # torch: only when needed

    checkpoint = latest_checkpoint(run_dir)
    # a client that trains nothing (mode frozen) stores nothing: its count is the config's
    if checkpoint is not None and (count := parameter_count(checkpoint, "client")):
        return count
    return analytic_client_params(row.get("model.name"), row.get("model.split_layer"))


def analytic_client_params(model: Any, split_layer: Any) -> int | None:
    """d_c from the model's config alone: embeddings plus k blocks (None when it cannot be read)."""
    if not isinstance(model, str) or not isinstance(split_layer, int):
        return None
    from hosl.memory.families import model_shapes
    from hosl.models.configs import builtin_config, builtin_config_names

    try:
        if model.lower() in builtin_config_names():
            config = builtin_config(model)
        elif (Path(model).expanduser() / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(Path(model).expanduser())
        else:
            return None
        shapes = model_shapes(config)
    except Exception:  # an unreadable or unsupported config only costs this one column
        return None
    return sum(shapes.embedding_tensors) + split_layer * sum(shapes.layer_tensors)


def table_columns(swept_keys: Sequence[str]) -> list[str]:
    """The standard columns, then every swept key that has no column of its own."""
    extra = [k for k in swept_keys if ALIASES.get(k, k) not in COLUMNS]
    return [*COLUMNS, *dict.fromkeys(extra)]


def _cell(column: str, value: Any) -> str:
    """Human-readable markdown cell: MiB for bytes, 4 digits for accuracies."""
    if value is None:
        return "-"
    if column.endswith("_bytes") and isinstance(value, (int, float)) and "wire" not in column:
        return f"{value / 2**20:,.1f}"
    if column == "wire_bytes" and isinstance(value, (int, float)):
        return f"{value / 2**20:,.2f}"
    if column == "client_params" and isinstance(value, int):
        return f"{value / 1e6:,.2f}M" if value >= 10**6 else f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value).replace("|", "\\|")


def _header(column: str) -> str:
    if column.endswith("_bytes"):
        return f"{column} (MiB)"
    return column


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = [
        "| " + " | ".join(_header(c) for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def aggregate(
    rows: Sequence[dict[str, Any]], by: Sequence[str], metrics: Sequence[str] = METRICS
) -> list[dict[str, Any]]:
    """Mean and spread of each metric over the rows that agree on `by` (typically: over seeds).

    One dict per group, in first-seen order: the `by` values, `n` (rows in the group), and for
    each metric `<metric>_mean`, `<metric>_std` (sample standard deviation, n-1; None for a
    single value, whose spread is unknown), `<metric>_min`, `<metric>_max`. Missing (None)
    values are left out; a metric with no value at all gives None everywhere.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(ALIASES.get(k, k)) for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(by, key))
        entry["n"] = len(members)
        for metric in metrics:
            values = [float(r[metric]) for r in members if r.get(metric) is not None]
            entry[f"{metric}_mean"] = statistics.fmean(values) if values else None
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
            entry[f"{metric}_min"] = min(values) if values else None
            entry[f"{metric}_max"] = max(values) if values else None
        out.append(entry)
    return out


def aggregate_markdown(
    groups: Sequence[dict[str, Any]], by: Sequence[str], metrics: Sequence[str]
) -> str:
    """`aggregate` output as a table of `mean ± std [min, max]` cells."""
    lines = [
        "| " + " | ".join([*by, "n", *map(_header, metrics)]) + " |",
        "|" + "---|" * (len(by) + 1 + len(metrics)),
    ]
    for g in groups:
        cells = [_cell(k, g[k]) for k in by] + [str(g["n"])]
        for m in metrics:
            mean, std = g[f"{m}_mean"], g[f"{m}_std"]
            if mean is None:
                cells.append("-")
                continue
            text = _cell(m, mean)
            if std is not None:
                text += f" ± {_cell(m, std)} [{_cell(m, g[f'{m}_min'])}, {_cell(m, g[f'{m}_max'])}]"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    rows: Sequence[dict[str, Any]], root: Path, swept_keys: Sequence[str], title: str,
    note: str = "",
) -> tuple[Path, Path]:
    """results.csv (raw numbers) and results.md (readable; mean over seeds when seeds vary)."""
    columns = table_columns(swept_keys)
    csv_path, md_path = root / "results.csv", root / "results.md"
    # An fo run's zo.lr is the base's unused default: blank it rather than tabulate it as a setting.
    rows = [effective(row) for row in rows]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    runs = f"{len(rows)} finished run{'s' if len(rows) != 1 else ''}{note}"
    text = [f"# {title}", f"{runs}. Bytes in MiB; `-`: not applicable."]
    text.append(markdown_table(rows, columns))
    by = [k for k in swept_keys if ALIASES.get(k, k) != "seed"]
    if len(by) < len(swept_keys) and rows:
        # Seeds were swept: the README wants mean ± spread over them.
        metrics = ["eval_accuracy", "zero_shot_accuracy", "client_peak_bytes", "seconds_per_step"]
        text.append("\n## Mean over seeds\n\n`mean ± std [min, max]`; std is the sample std.\n\n")
        text.append(aggregate_markdown(aggregate(rows, by, metrics), by, metrics))
    md_path.write_text("\n\n".join(t.strip("\n") for t in text) + "\n")
    return csv_path, md_path
