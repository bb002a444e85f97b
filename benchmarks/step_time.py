"""Wall time per training step of each split mode, and what the cut-gradient estimator saves.

    python benchmarks/step_time.py [--qs 1 4 16] [--repeats 3] [--grpc-repeats 5]

1. **In process**, at the demo's shapes (SmolLM2-135M split at k = 4, batches of 16 synthetic
   sequences of 64 tokens): `frozen`, `fo`, and for each Q `hosl` with the `losses` estimator,
   `hosl` with `cut-grad` and `zo`. Every configuration is built once from the same weights;
   after a warm-up step each, the configurations take their steps in turn (`--repeats` rounds),
   so load drifts hit all alike. Reported: the median seconds per step and its ratio to `fo`.
   Target: at Q = 4, cut-grad ≤ 0.6x the time of losses.
2. **Over loopback gRPC**, client and server in separate processes (`hosl serve` subprocesses):
   `hosl` + `cut-grad` at Q = 1, whose client runs its two perturbed forwards while the server
   backpropagates, against `fo`, interleaved the same way. Target: cut-grad ≤ fo, with hosl's
   default row-sparse embedding noise (every-row noise beside it). Client and server stand for
   two machines: on one machine give each process a core of its own (`OMP_NUM_THREADS=1`, which
   the servers inherit); with more threads than cores the overlap only makes them contend.

`--parts in-process grpc` (the default: both) runs either part alone; each part's results are
merged into step_time.json as soon as it ends, so one part's figures survive a failure in the
other. `--from-log LOG` re-derives the in-process part from the progress lines (`step N name:
S s`) a complete in-process part printed, instead of measuring it again.

Writes benchmarks/results/step_time.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from machine_info import describe, machine
from transport import BATCH, LENGTH, SPLIT, synthetic_batches

from hosl.build import Run, build_run
from hosl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.models.loading import load_pretrained
from hosl.remote import RemoteOptions, make_transport

MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parent
TARGET_CUT_VS_LOSSES = 0.6
SETTINGS = {"split": SPLIT}  # --split-layer (a smoke run on a small model needs a smaller one)


def config(mode: str, q: int = 1, estimator: str = "losses", model: str = MODEL,
           noise: str = "all") -> TrainConfig:
    return TrainConfig(
        mode=mode,
        steps=1000,
        batch_size=BATCH,
        model=ModelConfig(name=model, split_layer=SETTINGS["split"]),
        data=DataConfig(max_length=LENGTH),
        zo=ZoConfig(q=q, eps=1e-3, lr=1e-5, estimator=estimator, embedding_noise=noise),
        optim=OptimConfig(optimizer="adamw", lr=3e-5),
    )


def in_process_configs(qs: list[int], model: str) -> dict[str, TrainConfig]:
    configs = {"frozen": config("frozen", model=model), "fo": config("fo", model=model)}
    for q in qs:
        configs[f"hosl losses Q={q}"] = config("hosl", q, model=model)
        configs[f"hosl cut-grad Q={q}"] = config("hosl", q, "cut-grad", model)
        configs[f"zo Q={q}"] = config("zo", q, model=model)
    return configs


def interleaved(runs: dict[str, Run], batches: list, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run's steps 1..repeats (step 0 warms up), the runs taking turns."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run.train_step([batches[step]], step)
            if step:
                seconds[name].append(time.perf_counter() - start)
            print(f"  step {step} {name}: {time.perf_counter() - start:.2f} s", flush=True)
    return seconds


def start_server(mode: str, model: str, out: Path) -> tuple[subprocess.Popen, int]:
    cmd = [
        sys.executable,
        "-m",
        "hosl.cli",
        "serve",
        "--model",
        model,
        "--mode",
        mode,
        "--split-layer",
        str(SETTINGS["split"]),
        "--fo-lr",
        "3e-5",
        "--optimizer",
        "adamw",
        "--port",
        "0",
        "--output",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "server.json").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"hosl serve --mode {mode} did not start")
        time.sleep(0.2)
    return proc, json.loads((out / "server.json").read_text())["port"]


def summarise(seconds: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    return {
        name: {
            "median_s": m,
            f"ratio_to_{reference}": m / medians[reference],
            "steps": seconds[name],
        }
        for name, m in medians.items()
    }


PROGRESS = re.compile(r"^\s*step (\d+) (.+): ([0-9.]+) s$")


def from_log(text: str) -> dict[str, list[float]]:
    """The timed steps (1 and later) of each configuration in an in-process progress log."""
    seconds: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.strip() == "over loopback gRPC":
            break
        if (m := PROGRESS.match(line)) and int(m[1]) > 0:
            seconds.setdefault(m[2], []).append(float(m[3]))
    if not seconds:
        raise SystemExit("no in-process progress lines ('  step N name: S s') in the log")
    return seconds


def measure_in_process(base: Any, qs: list[int], repeats: int, model: str = MODEL,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    batches = synthetic_batches(base.config.vocab_size, repeats + 1)
    log("in process")
    runs = {
        name: build_run(cfg, copy.deepcopy(base))
        for name, cfg in in_process_configs(qs, model).items()
    }
    return summarise(interleaved(runs, batches, repeats), "fo")


def measure_grpc(base: Any, grpc_repeats: int, model: str = MODEL,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    batches = synthetic_batches(base.config.vocab_size, grpc_repeats + 1)
    log("over loopback gRPC")
    with ExitStack() as stack:
        remote_runs = {}
        for name, cfg in (
            # row-sparse embedding noise, hosl's default: no (V, d) noise is ever drawn
            ("hosl cut-grad Q=1", config("hosl", 1, "cut-grad", model, "batch")),
            ("hosl cut-grad Q=1, every-row noise", config("hosl", 1, "cut-grad", model)),
            ("fo", config("fo", model=model)),
        ):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            proc, port = start_server(cfg.mode, model, tmp / "server")
            stack.callback(proc.wait, 60)
            stack.callback(proc.terminate)
            net = copy.deepcopy(base)
            transport = make_transport(cfg, net, RemoteOptions(f"127.0.0.1:{port}"))
            stack.callback(transport.close)
            transport.connect()
            remote_runs[name] = build_run(cfg, net, transport)
        return summarise(interleaved(remote_runs, batches, grpc_repeats), "fo")


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    local, remote = result.get("in_process", {}), result.get("grpc", {})
    out = []
    if "hosl losses Q=4" in local:
        ratio = local["hosl cut-grad Q=4"]["median_s"] / local["hosl losses Q=4"]["median_s"]
        out.append(
            {
                "target": "in process, Q = 4: cut-grad <= 0.6x losses",
                "value": ratio,
                "verdict": "met" if ratio <= TARGET_CUT_VS_LOSSES else "missed",
            }
        )
    if "hosl cut-grad Q=1" in remote:
        ratio = remote["hosl cut-grad Q=1"]["ratio_to_fo"]
        out.append(
            {
                "target": "loopback gRPC, Q = 1: cut-grad step <= fo step",
                "value": ratio,
                "verdict": "met" if ratio <= 1.0 else "missed",
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Seconds per training step, by mode",
        "",
        f"- Machine: {describe(m)}.",
        f"- Shapes: {result['model']} split at k = {result['split_layer']}, "
        f"{BATCH} x {LENGTH} synthetic tokens per step (the demo's), AdamW on every FO side. "
        "Median of the timed steps after one warm-up step each, the configurations taking "
        "their steps in turn.",
    ]
    for title, key in (("In process", "in_process"),
                       ("Loopback gRPC (client and server in separate processes)", "grpc")):
        if key not in result:
            continue
        run = result["runs"][key]
        load = ("1-minute load average not recorded" if run["load_average"] is None else
                f"1-minute load average {run['load_average'][0]:.2f} at the start, "
                f"{run['load_average_end'][0]:.2f} at the end")
        lines += ["", f"## {title}", "",
                  f"{run['date']}, `{run['command']}`; {load}{run.get('note', '')}.", "",
                  "| configuration | s/step | ÷ fo |", "|---|---:|---:|"]
        lines += [f"| {name} | {row['median_s']:.2f} | {row['ratio_to_fo']:.2f} |"
                  for name, row in result[key].items()]
    lines += ["", "## Targets", ""]
    lines += [f"- **{v['verdict']}**: {v['target']} ({v['value']:.2f})" for v in result["verdicts"]]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    result["verdicts"] = verdicts(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "step_time.md").write_text(markdown(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3, help="timed in-process steps per config")
    ap.add_argument("--grpc-repeats", type=int, default=5, help="timed gRPC steps per config")
    ap.add_argument("--model", default=MODEL, help="model (a small local one for a smoke run)")
    ap.add_argument("--split-layer", type=int, default=SPLIT)
    ap.add_argument("--parts", nargs="+", choices=("in-process", "grpc"),
                    default=["in-process", "grpc"])
    ap.add_argument("--from-log", type=Path, metavar="LOG",
                    help="the in-process part from an earlier run's progress lines")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    SETTINGS["split"] = args.split_layer
    path = args.out / "step_time.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("model") != args.model or result.get("split_layer") != args.split_layer:
        result = {}  # another shape: nothing to merge with
    result.update(machine=machine(), model=args.model, split_layer=args.split_layer)
    result.setdefault("runs", {})
    command = "python benchmarks/step_time.py " + " ".join(sys.argv[1:])
    base = None  # the pretrained model, loaded once for the parts that measure
    for part in args.parts:
        key = part.replace("-", "_")
        run = {"date": datetime.date.today().isoformat(), "command": command,
               "load_average": os.getloadavg()}
        if part == "in-process" and args.from_log is not None:
            result[key] = summarise(from_log(args.from_log.read_text()), "fo")
            run.update(load_average=None, note=(
                f". The figures are those the measuring run printed ({args.from_log.name}, "
                "re-derived from its progress lines, not measured again)"))
        else:
            base = base if base is not None else load_pretrained(args.model)[0]
            result[key] = (measure_in_process(base, args.qs, args.repeats, args.model)
                           if part == "in-process"
                           else measure_grpc(base, args.grpc_repeats, args.model))
        run["load_average_end"] = None if run["load_average"] is None else os.getloadavg()
        result["runs"][key] = run
        write(result, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
