"""Seconds per HOSL step in-process vs over loopback gRPC (float32 and bf16 wire).

    python benchmarks/transport.py [--model smollm2-135m] [--steps 3] [--qs 1 4]

For each Q, three runs start from the same weights and train on the same synthetic batches
(batch 16, length 64, a SmolLM2-135M-shaped activation of 16 x 64 x 576): in-process
(`LocalTransport`), and against a `hosl serve` subprocess on 127.0.0.1 with a float32 and a
bfloat16 wire. The three runs take their steps in turn; after one warm-up step, `--steps` steps
are timed. Reported per run: the median seconds per step, the network's overhead over
in-process, encoded bytes and round trips per step, and for bf16 the largest change of a step's
loss against the float32 wire. Writes benchmarks/results/transport.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import torch

from hosl.batching import Batch, ScoreSpec
from hosl.build import build_run
from hosl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.models.loading import load_pretrained
from hosl.remote import RemoteOptions, make_transport

ROOT = Path(__file__).resolve().parent
BATCH, LENGTH = 16, 64
SPLIT = 4  # --split-layer; the default of hosl's config


def synthetic_batches(vocab: int, count: int, seed: int = 0) -> list[Batch]:
    """Full-length sequences; each example scores two single-token candidates at its last token."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=gen)
        spec = ScoreSpec(
            positions=torch.arange(BATCH) * LENGTH + LENGTH - 1,
            position_index=torch.arange(BATCH).repeat_interleave(2),
            tokens=torch.randint(0, vocab, (2 * BATCH,), generator=gen),
            candidate_index=torch.arange(2 * BATCH),
            labels=torch.randint(0, 2, (BATCH,), generator=gen),
            num_candidates=2,
        )
        out.append(Batch(ids, torch.ones_like(ids), spec))
    return out


def config(model: str, q: int, wire: str, steps: int, split: int) -> TrainConfig:
    return TrainConfig(
        mode="hosl",
        steps=steps,
        batch_size=BATCH,
        wire_dtype=wire,
        model=ModelConfig(name=model, split_layer=split),
        data=DataConfig(max_length=LENGTH),
        zo=ZoConfig(q=q, eps=1e-3, lr=1e-6),
        optim=OptimConfig(optimizer="adamw", lr=1e-5),
    )


def start_server(model: str, split: int, out: Path) -> tuple[subprocess.Popen, int]:
    cmd = [
        sys.executable, "-m", "hosl.cli", "serve", "--model", model, "--mode", "hosl",
        "--split-layer", str(split), "--server-lr", "1e-5", "--optimizer", "adamw",
        "--port", "0", "--output", str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "server.json").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("hosl serve did not start")
        time.sleep(0.2)
    return proc, json.loads((out / "server.json").read_text())["port"]


TRANSPORTS = ("in-process", "grpc float32", "grpc bfloat16")


def bench(model_name: str, qs: list[int], steps: int, split: int) -> list[dict]:
    """Per Q: the three runs step in turn (in-process, gRPC float32, gRPC bf16, then again), so
    load from anything else on the machine falls on all three alike; the median step counts."""
    base, _ = load_pretrained(model_name)
    batches = synthetic_batches(base.config.vocab_size, steps + 1)
    rows = []
    with ExitStack() as stack:
        for q in qs:
            runs = {}
            for transport in TRANSPORTS:
                wire = "bfloat16" if transport.endswith("bfloat16") else "float32"
                cfg = config(model_name, q, wire, steps + 1, split)
                model = copy.deepcopy(base)
                if transport == "in-process":
                    runs[transport] = build_run(cfg, model)
                    continue
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                proc, port = start_server(model_name, split, tmp / "server")
                stack.callback(proc.wait, 60)
                stack.callback(proc.terminate)
                remote = make_transport(cfg, model, RemoteOptions(f"127.0.0.1:{port}"))
                stack.callback(remote.close)
                remote.connect()
                runs[transport] = build_run(cfg, model, remote)
            before = {}
            times: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
            losses: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
            for step in range(steps + 1):  # step 0 warms up
                for transport, run in runs.items():
                    if step == 1:
                        before[transport] = copy.deepcopy(run.transport.stats.train)
                    t0 = time.perf_counter()
                    losses[transport].append(run.train_step([batches[step]], step))
                    if step:
                        times[transport].append(time.perf_counter() - t0)
            local = statistics.median(times["in-process"])
            for transport, run in runs.items():
                after, start = run.transport.stats.train, before[transport]
                row = {
                    "q": q,
                    "transport": transport,
                    "seconds_per_step": statistics.median(times[transport]),
                    "step_seconds": times[transport],
                    "overhead_vs_in_process": statistics.median(times[transport]) / local - 1,
                    "bytes_per_step": (after.wire_bytes - start.wire_bytes) / steps,
                    "round_trips_per_step": (after.round_trips - start.round_trips) / steps,
                    "losses": losses[transport],
                }
                if transport == "grpc bfloat16":
                    row["max_abs_loss_change_vs_float32_wire"] = max(
                        abs(a - b) for a, b in zip(losses[transport], losses["grpc float32"])
                    )
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            runs.clear()
    return rows


def machine() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| Q | transport | s/step | vs in-process | MB/step | round trips/step | "
        "max abs loss change vs float32 wire |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        change = r.get("max_abs_loss_change_vs_float32_wire")
        lines.append(
            f"| {r['q']} | {r['transport']} | {r['seconds_per_step']:.3f} | "
            f"{100 * r['overhead_vs_in_process']:+.1f}% | {r['bytes_per_step'] / 1e6:.2f} | "
            f"{r['round_trips_per_step']:.0f} | {'' if change is None else f'{change:.2e}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--qs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--split-layer", type=int, default=SPLIT)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    rows = bench(args.model, args.qs, args.steps, args.split_layer)
    command = "python benchmarks/transport.py " + " ".join(sys.argv[1:])
    result = {
        "command": command.strip(),
        "machine": machine(),
        "setup": {
            "model": args.model,
            "batch": BATCH,
            "length": LENGTH,
            "split_layer": args.split_layer,
            "mode": "hosl",
            "timed_steps": args.steps,
            "warmup_steps": 1,
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transport.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    md = (
        "# Transport benchmark: in-process vs loopback gRPC\n\n"
        f"Command: `{result['command']}`\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; torch {m['torch']} "
        f"({m['torch_threads']} threads), grpcio {m['grpcio']}, Python {m['python']}.\n\n"
        f"Model {args.model}, split at layer {args.split_layer}, mode hosl, batch {BATCH} x length "
        f"{LENGTH} (activation {BATCH} x {LENGTH} x hidden); one warm-up step, "
        f"{args.steps} timed steps, the three runs stepping in turn (median reported); client "
        "and server are separate processes for gRPC. The machine was shared with other jobs, "
        "so absolute times vary; the runs are interleaved so that load falls on all alike.\n\n"
        + table(rows)
        + "\n"
    )
    (out / "transport.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
