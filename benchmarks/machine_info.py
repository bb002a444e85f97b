"""The machine a benchmark ran on, recorded beside its results (every benchmark shares it)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers


def machine(**extra: Any) -> dict[str, Any]:
    """CPU model, cores, torch threads, GPU and library versions, plus `extra` fields."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(), **extra,
    }


def describe(m: dict[str, Any]) -> str:
    """One line for a results file: CPU, cores, GPU, torch threads and library versions."""
    gpu = m.get("gpu") or "no GPU"
    return (f"{m['cpu']}, {m['cores']} cores, {gpu}, {m['torch_threads']} torch thread(s); "
            f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}")


def run_lines(result: dict[str, Any], shared: bool = False) -> list[str]:
    """A results file's machine and date lines, from a result holding `machine`, `load_average`
    ({start, end}), `date` and `wall_seconds`."""
    load = result["load_average"]
    return [
        f"- Machine: {describe(result['machine'])}. "
        + ("Shared with other work: " if shared else "")
        + f"1-minute load average {load['start']} at the start, {load['end']} at the end.",
        f"- Date: {result['date']}; wall time {result['wall_seconds']} s.",
    ]


def finish(result: dict[str, Any], started: float, load_start: float, out: Path, name: str,
           render: Callable[[dict[str, Any]], str]) -> None:
    """Stamp `result` with its wall time (since `started`, a perf_counter) and the 1-minute load
    average at its start and now, write <out>/<name>.json and <name>.md (`render`), print it."""
    result["wall_seconds"] = round(time.perf_counter() - started)
    result["load_average"] = {"start": load_start, "end": round(os.getloadavg()[0], 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render(result)
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
