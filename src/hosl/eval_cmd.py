"""`hosl eval`: accuracy and predictions for a base model (split or not) or a trained run."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from hosl.build import build_run
from hosl.checkpoint import is_checkpoint, load_latest, read_checkpoint
from hosl.config import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_split_layer,
    load_run_config,
    validate,
)
from hosl.dtypes import DTYPES, canonical_name
from hosl.errors import HoslError
from hosl.evaluation import evaluate
from hosl.models.loading import load_pretrained
from hosl.models.split import num_layers
from hosl.rundir import claim_dir, stamp
from hosl.tasks import load_examples


def _config(
    model: str | None,
    run_dir: Path | None,
    task: str | None,
    eval_file: str | None,
    split_layer: int | None,
    eval_examples: int | None,
    max_length: int | None,
    seed: int,
    dtype: str,
) -> TrainConfig:
    if run_dir is not None:
        if not (run_dir / "config.yaml").is_file():
            raise HoslError(f"--run {run_dir}: not a run directory (no config.yaml)")
        cfg = load_run_config(run_dir / "config.yaml")
        if model is not None or split_layer is not None:
            raise HoslError(
                "--run evaluates the run's own model and split; drop --model/--split-layer"
            )
    else:
        # A split evaluation goes through the client and server parties and the transport,
        # exactly as training does; without --split-layer the whole model scores in one place.
        mode = "zo-full" if split_layer is None else "zo"
        cfg = TrainConfig(
            mode=mode,
            seed=seed,
            model=ModelConfig(
                name=model or "smollm2-135m",
                split_layer=split_layer or 0,
                dtype=canonical_name(dtype) or dtype,
            ),
        )
    data = cfg.data
    data = replace(
        data,
        task=task or data.task,
        eval_file=eval_file or data.eval_file,
        eval_examples=eval_examples if eval_examples is not None else data.eval_examples,
        max_length=max_length or data.max_length,
    )
    if task and task != cfg.data.task and eval_file is None:
        data = replace(data, eval_file=None)
    cfg = replace(cfg, data=DataConfig(**vars(data)))
    validate(cfg)
    return cfg


def _split_state(
    cfg: TrainConfig, run_dir: Path, server_run: Path | None, command: str = "hosl eval --run"
) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of a run's newest checkpoint, with the server's part from `server_run` when
    the run is a networked client's (and that server's own `server.*` config under
    "server_config": its adapter is set on its side); None for a run without checkpoints."""
    loaded = load_latest(run_dir)
    if loaded is None:
        if server_run is not None:
            raise HoslError(f"--run {run_dir} has no checkpoint to pair with --server-run")
        return None
    step, state, _ = loaded
    networked_client = "client" in state and "server" not in state
    if server_run is None:
        if networked_client:
            raise HoslError(
                f"--run {run_dir} is a `hosl client` run: its server part lives in the `hosl "
                f"serve` directory; give it: `{command} {run_dir} --server-run SERVER_DIR`"
            )
        return step, state
    if not networked_client:
        raise HoslError(f"--run {run_dir} holds its server part; drop --server-run")
    server_cfg_path = server_run / "config.yaml"
    if not server_cfg_path.is_file():
        raise HoslError(f"--server-run {server_run}: not a server directory (no config.yaml)")
    server_cfg = load_run_config(server_cfg_path)
    mine = (cfg.mode, cfg.model.name, cfg.model.split_layer, cfg.model.dtype)
    theirs = (server_cfg.mode, server_cfg.model.name, server_cfg.model.split_layer,
              server_cfg.model.dtype)
    if mine != theirs:
        raise HoslError(f"--server-run {server_run} serves {theirs}, the run is {mine}")
    path = server_run / "checkpoints" / f"step-{step}"
    if not is_checkpoint(path):
        raise HoslError(
            f"--server-run {server_run} has no checkpoint of step {step}, the client's newest"
        )
    server_state = read_checkpoint(path)
    return step, {**state, "server": server_state["server"], "server_config": server_cfg.server}


def run_eval(
    *,
    model: str | None,
    run_dir: Path | None,
    task: str | None,
    eval_file: str | None,
    split_layer: int | None,
    eval_examples: int | None,
    batch_size: int,
    max_length: int | None,
    seed: int,
    output: Path | None,
    dtype: str,
    server_run: Path | None = None,
) -> dict[str, Any]:
    # Every check that needs no model comes first: a mistake costs no model load.
    if batch_size < 1:
        raise HoslError(f"--batch-size must be >= 1, got {batch_size}")
    if server_run is not None and run_dir is None:
        raise HoslError("--server-run pairs with --run (a `hosl client` run directory)")
    cfg = _config(
        model, run_dir, task, eval_file, split_layer, eval_examples, max_length, seed, dtype
    )
    examples = load_examples(
        cfg.data.task,
        cfg.data.eval_split,
        file=cfg.data.eval_file,
        n=cfg.data.eval_sample_size(),
        seed=cfg.seed,
    )
    loaded = _split_state(cfg, run_dir, server_run) if run_dir is not None else None
    if loaded is not None and "server_config" in loaded[1]:  # the server's adapter is its own
        cfg = replace(cfg, server=loaded[1].pop("server_config"))
    net, tokenizer = load_pretrained(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    if not cfg.mode.endswith("-full"):
        check_split_layer(cfg.model.split_layer, num_layers(net), cfg.model.name)
    run = build_run(cfg, net)
    step = 0
    if loaded is not None:
        step, state = loaded
        run.load_state_dict(state)
    if output is not None:
        out = output
    elif run_dir is not None:
        out = run_dir / f"eval-{cfg.data.task}"
    else:
        out = claim_dir(Path("runs"), f"eval-{cfg.data.task}-{stamp()}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    acc = evaluate(
        run.scores,
        examples,
        tokenizer,
        batch_size=batch_size,
        max_length=cfg.data.max_length,
        padding_side=cfg.data.padding_side,
        predictions_path=out / "predictions.jsonl",
    )
    result = {
        "model": cfg.model.name,
        "task": cfg.data.task,
        "run": str(run_dir) if run_dir else None,
        "step": step,
        "split_layer": None if cfg.mode.endswith("-full") else cfg.model.split_layer,
        "eval_examples": len(examples),
        "eval_accuracy": acc,
        "wall_seconds": time.perf_counter() - t0,
        "predictions": str(out / "predictions.jsonl"),
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
