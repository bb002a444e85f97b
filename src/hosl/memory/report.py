"""`hosl memory`: what each party of a run would need, component by component, before running it.

    hosl memory --model opt-125m --split-layer 5 --batch-size 16 --max-length 64 --mode hosl

The numbers come from the analytic model (`hosl.memory.analytic`), which is checked against the
real split training loops (tests/test_memory_split.py), so no model is loaded and nothing is
downloaded: a built-in config name, a model directory or a config.json is all it needs.
`--logits full` shows what a server that applies its head at every position — a (B x L x V)
logits tensor, as an ordinary causal-LM loss does — would need instead of hosl's scored positions.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from hosl.config import SPLIT_MODES
from hosl.errors import ConfigError
from hosl.memory.analytic import MODES, MemoryEstimate, estimate, human_bytes
from hosl.models.configs import builtin_config, builtin_config_names

__all__ = ["format_report", "load_model_config", "run_memory_command"]

# hosl loads models with transformers' default attention kernel, which is sdpa.
DEFAULT_ATTENTION = "sdpa"

# (component key, row label); the row order of the table.
_ROWS = (
    ("parameters", "parameters"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("stored_activations", "stored activations"),
    ("transient", "transient working set"),
    ("perturbation", "ZO perturbation (1 tensor)"),
    ("boundary", "cut-layer activations"),
    ("scores", "candidate scores"),
)
_ROLE_WORDS = {"fo": "first-order", "zo": "zeroth-order", "inference": "inference only"}


def load_model_config(model: str) -> tuple[str, PretrainedConfig]:
    """A built-in name, a model directory holding config.json, or a config.json file ->
    (a label for the report, the transformers config). Raises ConfigError on anything else."""
    if model.strip().lower() in builtin_config_names():
        config = builtin_config(model)
        return f"{model.strip().lower()} ({config.name_or_path})", config
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"model directory {path} has no config.json; point --model at a "
                          "directory with one, at a config.json, or use a built-in name")
    if not path.exists():
        raise ConfigError(
            f"unknown model {model!r}: use a built-in name ({', '.join(builtin_config_names())}),"
            " a model directory containing config.json, or the path of a config.json"
        )
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot read a model config from {path}: {first_line}") from None
    return str(path), config


def _check_split(mode: str, split_layer: int | None, config: PretrainedConfig) -> int | None:
    if mode not in SPLIT_MODES and mode != "inference":
        return None  # unsplit modes: one party, the whole model
    layers = getattr(config, "num_hidden_layers", None)
    if split_layer is None:
        if mode == "inference":
            return None
        raise ConfigError(
            f"mode {mode!r} splits the model: give --split-layer K with 0 <= K <= {layers} "
            "(the client holds the embeddings and blocks 0..K-1)"
        )
    if layers is not None and not 0 <= split_layer <= layers:
        raise ConfigError(
            f"--split-layer {split_layer} is outside 0..{layers} for this model "
            f"({layers} blocks)"
        )
    return split_layer


def _boundary_label(est: MemoryEstimate) -> str:
    # (B, L, H) tensors held at once: the client streams its perturbed ones, the server keeps them
    copies = {"hosl": "client h, server 2Q+1", "zo": "client h+, server 2Q", "fo": "h, dL/dh",
              "inference": "h"}.get(est.mode)
    if est.mode == "hosl" and est.estimator == "cut-grad":
        copies = "client dL/dh and h+, server h"
    return f"cut-layer activations ({copies})" if copies else "cut-layer activations"


def _scores_label(est: MemoryEstimate) -> str:
    if est.logits == "full":
        return "full logits (B x L x V)"
    return "candidate scores (B x P x V)"


def _savings_lines(est: MemoryEstimate) -> list[str]:
    """One line naming the memory-saving choices the estimate was made with, if any."""
    parts = [f"checkpointing: {', '.join(est.checkpointing)}"] if est.checkpointing else []
    if est.fused_update:
        parts.append("fused SGD update on the client")
    if est.client_optimizer:
        parts.append(f"client optimizer {est.client_optimizer}")
    parts += [f"LoRA rank {spec.rank} on {', '.join(spec.targets)} ({party})"
              for party, spec in est.adapters.items()]
    return ["; ".join(parts)] if parts else []


def format_report(est: MemoryEstimate, label: str, *, full_logits_server: int | None = None) -> str:
    """The table `hosl memory` prints: one column per party, one row per component, the peak."""
    k, n = est.split_layer, est.n_layers
    split = "unsplit: one party holds the whole model" if k is None else (
        f"split after block {k} of {n}: client = embeddings + {k} block(s), "
        f"server = {n - k} block(s) + final norm + head"
    )
    roles = ", ".join(
        f"{name} {_ROLE_WORDS[party.role]}" for name, party in est.parties.items()
    )
    fo_parties = [p for p in est.parties.values() if p.role == "fo"]
    optimizer = f"FO optimizer {est.optimizer}" if fo_parties else "no FO optimizer state"
    lines = [
        f"model {label}: mode {est.mode} ({roles})",
        split,
        f"batch {est.batch} x {est.length} tokens, {est.dtype}, {optimizer}, q={est.q}, "
        f"{est.positions} scored position(s) per sequence, {est.logits} logits, "
        f"{est.attention} attention"
        + (", cut-grad estimator (server returns dL/dh)" if est.estimator == "cut-grad" else ""),
        *_savings_lines(est),
        "",
    ]
    names = list(est.parties)
    labels = dict(_ROWS)
    labels["boundary"] = _boundary_label(est)
    labels["scores"] = _scores_label(est)
    rows = [(labels[key], [est.parties[p].components[key] for p in names]) for key, _ in _ROWS]
    rows.append(("total (modelled peak)", [est.parties[p].total for p in names]))
    width = max(len(text) for text, _ in rows) + 2
    lines.append("component".ljust(width) + "".join(f"{p:>14}" for p in names))
    for text, values in rows:
        lines.append(text.ljust(width) + "".join(f"{human_bytes(v):>14}" for v in values))
    lines.append("peak phase".ljust(width)
                 + "".join(f"{est.parties[p].peak_phase:>14}" for p in names))
    lines += [
        "",
        "total = parameters + optimizer state + the largest phase's working bytes: the other",
        "components are not all live at once. Bytes of live tensors; allocator overhead and",
        "serialised wire buffers are not included.",
    ]
    server = est.parties.get("server") or est.parties.get("model")
    if full_logits_server is not None and server is not None and server.role == "fo":
        lines.append(
            f"A server materialising (B x L x V) logits would peak at "
            f"{human_bytes(full_logits_server)} ({full_logits_server / server.total:.1f}x this); "
            "see --logits full."
        )
    return "\n".join(lines)


def run_memory_command(
    *,
    model: str,
    split_layer: int | None,
    batch_size: int,
    max_length: int,
    mode: str,
    dtype: str = "float32",
    optimizer: str = "adamw",
    logits: str = "scored",
    q: int = 1,
    as_json: bool = False,
    attention: str = DEFAULT_ATTENTION,
    savings: dict[str, Any] | None = None,
) -> str:
    """What `hosl memory` prints: the per-party table, or JSON (bytes) with `as_json`.

    `savings` are `estimate`'s memory-saving arguments (checkpointing, fused_update,
    client_optimizer, adapters); the full-logits comparison gets the same ones."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    label, config = load_model_config(model)
    split = _check_split(mode, split_layer, config)
    kwargs = dict(
        split_layer=split, batch=batch_size, length=max_length, mode=mode, dtype=dtype,
        optimizer=optimizer, q=q, attention=attention, **(savings or {}),
    )
    est = estimate(config, logits=logits, **kwargs)
    full = None
    if logits == "scored":
        full_est = estimate(config, logits="full", **kwargs)
        server = full_est.parties.get("server") or full_est.parties.get("model")
        full = server.total if server is not None else None
    if as_json:
        payload = asdict(est)
        payload.update(model=label, units="bytes")
        if full is not None:
            payload["full_logits_server_total"] = full
        return json.dumps(payload, indent=2)
    return format_report(est, label, full_logits_server=full)
