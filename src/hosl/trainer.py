"""The training loop behind `hosl train`: one readable loop for every mode.

    load model and data -> build the run -> evaluate zero-shot -> for each step: micro-batches,
    one step of the mode, log -> evaluate -> summary.json

Everything a run produces lands in its run directory: config.yaml, metrics.jsonl (one line per
logged step), predictions.jsonl, checkpoints/, summary.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hosl.batching import collate
from hosl.build import Run, build_run
from hosl.checkpoint import load_latest, save_checkpoint
from hosl.config import TrainConfig, dump_config, load_config
from hosl.dtypes import DTYPES
from hosl.errors import ConfigError
from hosl.evaluation import evaluate
from hosl.memory.measure import peak_rss_bytes
from hosl.models.loading import load_pretrained
from hosl.models.split import num_layers
from hosl.remote import RemoteOptions, RemoteSession, make_transport
from hosl.sampler import step_indices
from hosl.tasks import load_examples
from hosl.transport.base import ResyncNeeded
from hosl.transport.grpc_client import GrpcTransport


def _examples(cfg: TrainConfig) -> tuple[list, list]:
    d = cfg.data
    # -1 asks for a whole split (hosl.tasks.ALL)
    train = load_examples(d.task, "train", file=d.train_file, n=d.train_examples, seed=cfg.seed)
    evals = load_examples(d.task, d.eval_split, file=d.eval_file, n=d.eval_examples, seed=cfg.seed)
    return train, evals


def new_run_dir(cfg: TrainConfig) -> Path:
    if cfg.output:
        path = Path(cfg.output)
        if path.exists() and any(path.iterdir()):
            raise ConfigError(
                f"run directory {path} is not empty; continue it with "
                f"--resume {path} or choose another --output"
            )
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.mode}-{cfg.data.task}-{stamp}"


def resume_config(run_dir: Path, steps: int | None) -> TrainConfig:
    """The saved config of a run, with only `steps` allowed to change (to extend it)."""
    cfg = load_config(run_dir / "config.yaml")
    return replace(cfg, steps=steps) if steps is not None else cfg


def train(
    cfg: TrainConfig,
    *,
    resume_dir: Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    remote: RemoteOptions | None = None,
) -> dict[str, Any]:
    """Train `cfg`; with `remote`, against a `hosl serve` process instead of in-process."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_pretrained(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    if cfg.mode not in ("fo-full", "zo-full"):
        n_layers = num_layers(model)
        if not 0 <= cfg.model.split_layer <= n_layers:
            raise ConfigError(
                f"split_layer must be between 0 and {n_layers} for "
                f"{cfg.model.name}, got {cfg.model.split_layer}"
            )
    train_set, eval_set = _examples(cfg)
    transport = None
    try:
        if remote is not None:
            transport = make_transport(cfg, model, remote)
            transport.connect()  # a refused token or handshake fails here, before any file
        run = build_run(cfg, model, transport)
        del model  # the parts hold what they need; a remote client keeps only its own part
        run_dir = resume_dir or new_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        return _train_loop(
            cfg, run, run_dir, resume_dir, tokenizer, train_set, eval_set, transport, progress,
            echo,
        )
    finally:
        if transport is not None:
            transport.close()


def _logged_steps(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    lines = (json.loads(x) for x in path.read_text().splitlines() if x.strip())
    return {x["step"] for x in lines if "loss" in x}


def _train_loop(
    cfg: TrainConfig,
    run: Run,
    run_dir: Path,
    resume_dir: Path | None,
    tokenizer: Any,
    train_set: list,
    eval_set: list,
    transport: GrpcTransport | None,
    progress: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    def batches(step: int) -> list:
        idx = step_indices(len(train_set), step, cfg.batch_size, cfg.grad_accum, cfg.seed)
        return [
            collate(
                [train_set[i] for i in micro], tokenizer, cfg.data.max_length, cfg.data.padding_side
            )
            for micro in idx
        ]

    def accuracy(predictions: Path | None = None) -> float:
        return evaluate(
            run.scores,
            eval_set,
            tokenizer,
            batch_size=cfg.batch_size,
            max_length=cfg.data.max_length,
            padding_side=cfg.data.padding_side,
            predictions_path=predictions,
        )

    metrics_path = run_dir / "metrics.jsonl"
    logged = _logged_steps(metrics_path)

    def log(record: dict[str, Any]) -> None:
        # append and close per line: a crash never loses a logged step
        if "loss" in record:
            if record["step"] in logged:
                return  # a step replayed or redone after a fault: already logged
            logged.add(record["step"])
        with open(metrics_path, "a") as metrics:
            metrics.write(json.dumps(record) + "\n")

    start, elapsed, meta = 0, 0.0, {}
    if resume_dir is not None and (loaded := load_latest(run_dir)) is not None:
        start, state, meta = loaded
        run.load_state_dict(state)
        elapsed = float(meta.get("wall_seconds", 0.0))
        if run.transport is not None:
            run.transport.stats.load(meta.get("wire", {}))
        echo(f"resumed {run_dir} at step {start}")
    session = None
    if transport is not None:
        session = RemoteSession(
            run,
            cfg,
            transport,
            run_dir,
            batches,
            echo,
            on_replayed=lambda step, loss: log(
                {"step": step + 1, "loss": loss, "replayed": True}
            ),
        )
        start = session.resync(start, transport.committed)
        echo(f"connected to {transport.address}; training from step {start}")
    zero_shot = meta.get("zero_shot_accuracy")
    if zero_shot is None and start == 0:
        zero_shot = accuracy()
        echo(f"zero-shot accuracy: {zero_shot:.4f} on {len(eval_set)} examples")

    t0 = time.perf_counter()

    def checkpoint(step: int) -> None:
        wire = run.transport.stats.dump() if run.transport is not None else {}
        save_checkpoint(
            run_dir,
            step,
            run.state_dict(),
            {
                "wall_seconds": elapsed + time.perf_counter() - t0,
                "wire": wire,
                "zero_shot_accuracy": zero_shot,
            },
        )

    bar = tqdm(
        initial=start,
        total=cfg.steps,
        disable=not progress,
        desc=f"{cfg.mode} k={cfg.model.split_layer}",
        unit="step",
    )
    loss = float("nan")
    meters = {name: party.start_metering(name) for name, party in run.parties().items()}
    step, final, train_seconds = start, None, 0.0
    step_times: dict[bool, list[float]] = {True: [], False: []}  # metered? -> seconds per step
    while final is None:
        try:
            while step < cfg.steps:
                if step == start + cfg.memory_steps:
                    for party in run.parties().values():
                        party.stop_metering()  # peaks repeat every step; tracking costs time
                metered = step < start + cfg.memory_steps
                tick = time.perf_counter()
                loss = run.train_step(batches(step), step)
                step_times[metered].append(time.perf_counter() - tick)
                done = step = step + 1
                bar.update(1)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    line = {
                        "step": done,
                        "loss": loss,
                        "wall_seconds": elapsed + time.perf_counter() - t0,
                    }
                    log(line)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                    acc = accuracy()
                    log({"step": done, "eval_accuracy": acc})
                    echo(f"step {done}: eval accuracy {acc:.4f}")
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    checkpoint(done)
            train_seconds = time.perf_counter() - t0
            checkpoint(cfg.steps)
            final = accuracy(run_dir / "predictions.jsonl")
        except ResyncNeeded as lost:
            if session is None:
                raise
            echo(f"the server is at step {lost.committed}, this client at step {step}; resyncing")
            step = session.resync(step, lost.committed)
            bar.n = step
            bar.refresh()
    bar.close()
    log({"step": cfg.steps, "eval_accuracy": final})

    stats = run.transport.stats if run.transport is not None else None
    # In process the server party is metered here; a networked server meters itself and reports
    # with its evaluation replies (None when it is unsplit, or an older server said nothing).
    server_memory = (
        {"peak_bytes": meters["server"].peak_bytes, "phase_peaks": meters["server"].phase_peaks()}
        if "server" in meters
        else getattr(run.transport, "server_memory", None) or {}
    )
    # Steady-state step time: the metered steps are slower (tracking costs time on every op).
    plain, metered_times = step_times[False], step_times[True]
    timed = plain or metered_times
    summary = {
        "mode": cfg.mode,
        "model": cfg.model.name,
        "task": cfg.data.task,
        "split_layer": None if cfg.mode.endswith("-full") else cfg.model.split_layer,
        "q": cfg.zo.q,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "eval_examples": len(eval_set),
        "client_params": _param_count(run.parties()["client"].part),
        "server_params": _param_count(run.server.part) if run.server is not None else None,
        "zero_shot_accuracy": zero_shot,
        "eval_accuracy": final,
        "final_loss": loss,
        "client_peak_bytes": meters["client"].peak_bytes,
        "server_peak_bytes": server_memory.get("peak_bytes"),
        "client_phase_peaks": meters["client"].phase_peaks(),
        "server_phase_peaks": server_memory.get("phase_peaks"),
        "peak_rss_bytes": peak_rss_bytes(),
        "wire_bytes": stats.train.wire_bytes if stats else 0,
        "round_trips": stats.train.round_trips if stats else 0,
        "eval_wire_bytes": stats.eval.wire_bytes if stats else 0,
        "eval_round_trips": stats.eval.round_trips if stats else 0,
        "wall_seconds": elapsed + train_seconds,
        "seconds_per_step": sum(timed) / len(timed) if timed else None,
        "seconds_per_metered_step": (
            sum(metered_times) / len(metered_times) if metered_times else None
        ),
        "server": transport.address if transport is not None else None,
        "wire_dtype": cfg.wire_dtype,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shot = "n/a" if zero_shot is None else f"{zero_shot:.4f}"
    echo(f"accuracy: zero-shot {shot} -> final {final:.4f}")
    echo(memory_line(summary))
    echo(f"run directory: {run_dir}")
    return summary


def _mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.1f} MiB"


def memory_line(summary: dict[str, Any]) -> str:
    if summary.get("server"):
        return (f"peak memory: client {_mb(summary['client_peak_bytes'])}, server "
                f"{_mb(summary['server_peak_bytes'])} as the server measured it (live tensor "
                f"bytes per party; this process's RSS {_mb(summary['peak_rss_bytes'])})")
    if summary["server_peak_bytes"] is None:
        return f"peak memory (one party, unsplit): {_mb(summary['client_peak_bytes'])}"
    return (f"peak memory: client {_mb(summary['client_peak_bytes'])}, "
            f"server {_mb(summary['server_peak_bytes'])} (live tensor bytes per party; "
            f"process RSS {_mb(summary['peak_rss_bytes'])})")


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

