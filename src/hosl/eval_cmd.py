"""`hosl eval`: accuracy and predictions for a base model (split or not) or a trained run."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from hosl.build import build_run
from hosl.checkpoint import load_latest
from hosl.config import DataConfig, ModelConfig, TrainConfig, load_config, validate
from hosl.dtypes import DTYPES
from hosl.errors import HoslError
from hosl.evaluation import evaluate
from hosl.models.loading import load_pretrained
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
        cfg = load_config(run_dir / "config.yaml")
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
                name=model or "smollm2-135m", split_layer=split_layer or 0, dtype=dtype
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
) -> dict[str, Any]:
    if batch_size < 1:
        raise HoslError(f"--batch-size must be >= 1, got {batch_size}")
    cfg = _config(
        model, run_dir, task, eval_file, split_layer, eval_examples, max_length, seed, dtype
    )
    net, tokenizer = load_pretrained(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    examples = load_examples(
        cfg.data.task,
        cfg.data.eval_split,
        file=cfg.data.eval_file,
        n=cfg.data.eval_examples,
        seed=cfg.seed,
    )
    run = build_run(cfg, net)
    step = 0
    if run_dir is not None and (loaded := load_latest(run_dir)) is not None:
        step, state, _ = loaded
        run.load_state_dict(state)
    out = output or (
        run_dir / f"eval-{cfg.data.task}"
        if run_dir
        else Path("runs") / f"eval-{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
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
