"""What a finished run reports: summary.json and the lines printed at its end."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hosl.build import Run
from hosl.config import ZO_MODES, TrainConfig
from hosl.memory.measure import peak_rss_bytes
from hosl.models.lora import trainable_count


@dataclass
class StepTimes:
    """Seconds per step, kept apart for metered steps (tracking memory costs time on every op)."""

    plain: list[float] = field(default_factory=list)
    metered: list[float] = field(default_factory=list)

    def add(self, seconds: float, metered: bool) -> None:
        (self.metered if metered else self.plain).append(seconds)

    def steady(self) -> float | None:
        """Steady-state seconds per step: the unmetered steps, else the metered ones."""
        timed = self.plain or self.metered
        return sum(timed) / len(timed) if timed else None

    def metered_mean(self) -> float | None:
        return sum(self.metered) / len(self.metered) if self.metered else None


def build_summary(
    cfg: TrainConfig,
    run: Run,
    run_dir: Path,
    meters: dict[str, Any],
    *,
    n_eval: int,
    zero_shot: float | None,
    final: float,
    loss: float,
    wall_seconds: float,
    times: StepTimes,
    server_address: str | None,
) -> dict[str, Any]:
    """The content of summary.json (see the README's run-directory table)."""
    stats = run.transport.stats if run.transport is not None else None
    # In process the server party is metered here; a networked server meters itself and reports
    # with its evaluation replies (None when it is unsplit, or an older server said nothing).
    server_memory = (
        {"peak_bytes": meters["server"].peak_bytes, "phase_peaks": meters["server"].phase_peaks()}
        if "server" in meters
        else getattr(run.transport, "server_memory", None) or {}
    )
    return {
        "mode": cfg.mode,
        "model": cfg.model.name,
        "task": cfg.data.task,
        "split_layer": None if cfg.mode.endswith("-full") else cfg.model.split_layer,
        "q": cfg.zo.q,
        # where the ZO client drew its embedding's noise (zo.embedding_noise, `auto` resolved)
        "embedding_noise": cfg.embedding_noise() if cfg.mode in ZO_MODES else None,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "eval_examples": n_eval,
        "client_params": param_count(run.parties()["client"].part),
        "server_params": param_count(run.server.part) if run.server is not None else None,
        # d_c: what the client trains (its ZO target in hosl and zo; its adapters alone with
        # client.adapter lora; nothing when frozen); the server's likewise (None when it is
        # another process)
        "client_trainable_params": trainable_count(run.parties()["client"].part),
        "server_trainable_params": (
            trainable_count(run.server.part) if run.server is not None else None
        ),
        "zero_shot_accuracy": zero_shot,
        "eval_accuracy": final,
        # None, not NaN (invalid JSON), when this session trained no step of its own (a client
        # that joined after the server had finished only replays)
        "final_loss": loss if math.isfinite(loss) else None,
        "client_peak_bytes": meters["client"].peak_bytes,
        "server_peak_bytes": server_memory.get("peak_bytes"),
        "client_phase_peaks": meters["client"].phase_peaks(),
        "server_phase_peaks": server_memory.get("phase_peaks"),
        "peak_rss_bytes": peak_rss_bytes(),
        "wire_bytes": stats.train.wire_bytes if stats else 0,
        "round_trips": stats.train.round_trips if stats else 0,
        "eval_wire_bytes": stats.eval.wire_bytes if stats else 0,
        "eval_round_trips": stats.eval.round_trips if stats else 0,
        "wall_seconds": wall_seconds,
        "seconds_per_step": times.steady(),
        "seconds_per_metered_step": times.metered_mean(),
        "server": server_address,
        "wire_dtype": cfg.wire_dtype,
        "run_dir": str(run_dir),
    }


def closing_lines(summary: dict[str, Any]) -> list[str]:
    """What `hosl train` prints when a run ends."""
    zero_shot = summary["zero_shot_accuracy"]
    shot = "n/a" if zero_shot is None else f"{zero_shot:.4f}"
    return [
        f"accuracy: zero-shot {shot} -> final {summary['eval_accuracy']:.4f}",
        memory_line(summary),
        f"run directory: {summary['run_dir']}",
    ]


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


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
