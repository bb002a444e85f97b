"""Seconds per round of N clients and one server, per mode: the server's share, the clients' and
the sync's.

    python benchmarks/round_time.py [--clients 4 16] [--repeats 2] [--modes hosl fo zo]

The clients study's settings (`experiments/clients.yaml`: SmolLM2-135M split at 4, `rt`, batches
of 8 examples of at most 64 tokens, IID partition, the parallel schedule, each mode at the study's
rates) in process, for `hosl`, `fo` (SplitFed) and `zo`. Every configuration is built from the
same loaded weights, takes one warm-up step, then one round (N steps); the configurations take
their rounds in turn, `--repeats` times, so load drifts hit all alike. Per round:

- server s: the server party's step calls (`hosl_step`, `fo_step`, `zo_step`), what one server
  machine would spend on the round's N client batches;
- sync s: what keeps θ_c the same everywhere: replaying the round's records on θ_c (`hosl`,
  `zo`; every client does this once per round) or FedAvg's copies, sums and mean (`fo`);
- client s/step: the rest of the round over its N steps, one client's step on its own device.

In process one core does all three in turn; on real machines the round's clients run side by
side, so the round takes about the server's time plus one client's step plus the sync. Writes
benchmarks/results/round_time.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine_info import describe, machine

import hosl.federated.run as federated_run
from hosl.batching import collate
from hosl.build import build_run
from hosl.config import ClientsConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.federated.run import FederatedRun, federate
from hosl.models.loading import load_pretrained
from hosl.tasks import load_examples

ROOT = Path(__file__).resolve().parent
BATCH, LENGTH, SPLIT = 8, 64, 4  # experiments/base.yaml
# experiments/clients.yaml: each mode at the rates the study trains it with
RATES = {"hosl": {"lr": 3e-5, "zo_lr": 1e-5}, "fo": {"lr": 3e-5, "zo_lr": 1e-6},
         "zo": {"lr": 1e-5, "zo_lr": 1e-4}}
SERVER_STEPS = ("hosl_step", "fo_step", "zo_step")


def config(mode: str, n: int, model: str, noise: str = "all") -> TrainConfig:
    rates = RATES[mode]
    return TrainConfig(
        mode=mode, steps=n + 1, batch_size=BATCH, seed=0, memory_steps=0,
        model=ModelConfig(name=model, split_layer=SPLIT),
        data=DataConfig(task="rt", max_length=LENGTH),
        zo=ZoConfig(q=1, eps=1e-3, lr=rates["zo_lr"], embedding_noise=noise),
        optim=OptimConfig(optimizer="adamw", lr=rates["lr"]),
        clients=ClientsConfig(n=n, schedule="parallel"),
    )


class Stopwatch:
    """Seconds spent inside the functions it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def instrument(run: FederatedRun) -> tuple[Stopwatch, Stopwatch]:
    """Stopwatches on the server's step calls and on the sync (record replay, FedAvg)."""
    server, sync = Stopwatch(), Stopwatch()
    # In process the client's perturbed forwards run lazily, when the transport streams each
    # activation to the server, i.e. inside the server's call: run them before it instead, so
    # the server's stopwatch holds the server's work alone (the same forwards, the same numbers).
    assert run.client is not None
    run.client.lazy_pairs = False
    for name in SERVER_STEPS:
        setattr(run.server, name, server.wrap(getattr(run.server, name)))
    if run.fedavg is not None:
        run.fedavg.begin = sync.wrap(run.fedavg.begin)  # type: ignore[method-assign]
        run.fedavg.end = sync.wrap(run.fedavg.end)  # type: ignore[method-assign]
    return server, sync


def one_round(mode: str, n: int, model_name: str, base: torch.nn.Module, tokenizer: Any,
              train: list, noise: str = "all") -> dict[str, float]:
    """Build `mode` with `n` clients from `base`'s weights, take a warm-up step, time a round."""
    cfg = config(mode, n, model_name, noise)
    run = federate(cfg, build_run(cfg, copy.deepcopy(base)), [ex.label for ex in train])

    def step(i: int) -> None:
        idx = run.example_indices(len(train), i, cfg.batch_size, 1, cfg.seed)
        run.train_step([collate([train[j] for j in micro], tokenizer, LENGTH) for micro in idx], i)

    # The warm-up: step 0 as a round of its own (a run's last step ends its round), untimed.
    # The timed round is then steps n .. 2n-1, round 1 of a run of 2n steps.
    run.total_steps = 1
    step(0)
    run.total_steps = 2 * n
    server, sync = instrument(run)
    replayed = Stopwatch()
    real_replay = federated_run.replay
    federated_run.replay = replayed.wrap(real_replay)  # the round's records applied to θ_c
    try:
        start = time.perf_counter()
        for i in range(n, 2 * n):
            step(i)
        wall = time.perf_counter() - start
    finally:
        federated_run.replay = real_replay
    sync_s = sync.seconds + replayed.seconds
    return {"round_s": wall, "server_s": server.seconds, "sync_s": sync_s,
            "client_s_per_step": (wall - server.seconds - sync_s) / n}


def render(result: dict) -> str:
    lines = [
        "# Seconds per round: server, sync and client",
        "",
        f"`{result['command']}` on {describe(result['machine'])}. SmolLM2-135M split at "
        f"{SPLIT}, `rt`, batch {BATCH} × ≤ {LENGTH} tokens, IID, parallel schedule, each mode "
        "at `experiments/clients.yaml`'s rates; one round after a warm-up step, configurations in "
        f"turn, {result['repeats']} repeat(s) (median; every repeat in the JSON)."
        + (f" {result['note']}" if result.get("note") else ""),
        "",
        "| mode | embedding noise | N | round s (one core, in process) | server s / round | "
        "server s / client step | sync s / round | client s / step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        m = {k: statistics.median(x[k] for x in r["repeats"]) for k in r["repeats"][0]}
        lines.append(
            f"| `{r['mode']}` | {r.get('noise', 'all')} | {r['n']} | {m['round_s']:.1f} | "
            f"{m['server_s']:.1f} | "
            f"{m['server_s'] / r['n']:.2f} | {m['sync_s']:.2f} | {m['client_s_per_step']:.2f} |"
        )
    lines += [
        "",
        "Server s / round is what one server spends on a round's N batches; sync s / round is "
        "record replay on θ_c (`hosl`, `zo`: each client applies the round's N records) or "
        "FedAvg's downloads, sums and mean (`fo`); client s / step is one client's own step. "
        "On real machines a round's clients step side by side.",
    ]
    return "\n".join(lines) + "\n"


def save(result: dict, out: Path) -> None:
    """Write the measurements (`out`.json) and the table rendered from them (`out`.md)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--modes", nargs="+", default=["hosl", "fo", "zo"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--noises", nargs="+", default=["all"], choices=["all", "batch"],
                        help="zo.embedding_noise of the ZO modes (the study ran `all`; `batch`, "
                        "row-sparse, is hosl's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "round_time")
    parser.add_argument("--note", default="", help="what else ran on the machine, etc.")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite the .md from the .json (and --note)")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.out.with_suffix(".json").read_text())
        result["note"] = args.note or result.get("note", "")
        save(result, args.out)
        return
    torch.manual_seed(0)
    base, tokenizer = load_pretrained(args.model)
    train = load_examples("rt", "train", n=1000, seed=0)
    rows = [{"mode": m, "noise": noise, "n": n, "repeats": []} for n in args.clients
            for m in args.modes for noise in (["all"] if m == "fo" else args.noises)]
    for repeat in range(args.repeats):
        for row in rows:
            row["repeats"].append(one_round(row["mode"], row["n"], args.model, base, tokenizer,
                                            train, row["noise"]))
            print(f"repeat {repeat} {row['mode']} {row['noise']} N={row['n']}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row["repeats"][-1].items()), flush=True)
    command = "python benchmarks/round_time.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in {"clients": args.clients, "modes": args.modes, "noises": args.noises,
                     "repeats": args.repeats}.items())
    result = {"model": args.model, "command": command, "repeats": args.repeats, "rows": rows,
              "machine": machine(), "note": args.note}
    save(result, args.out)
    print(render(result))


if __name__ == "__main__":
    main()
