"""What keeping N clients' θ_c in sync by update records costs, beside FedAvg of θ_c.

    python benchmarks/many_clients.py [--model smollm2-135m] [--clients 3] [--rounds 2]

Trains the sequential schedule in process (`hosl.federated`) on the `rt` pack (batch 16, length
64, split at layer 4, round-robin, IID partition) for `--rounds` rounds, for Q = 1 and 4 and both
`zo.embedding_noise` settings, and reports from the run's own counters: bytes of one update
record, sync bytes per client per round (catch-up downloads plus own uploads), and FedAvg's
2 × |θ_c| bytes per client per round. Activation traffic (the split itself) is reported apart:
it is the same with one client or many. Writes benchmarks/results/many_clients.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from machine_info import machine

from hosl.batching import collate
from hosl.build import build_run
from hosl.config import (
    ClientsConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ZoConfig,
)
from hosl.federated.run import federate
from hosl.models.loading import load_pretrained
from hosl.tasks import load_examples

ROOT = Path(__file__).resolve().parent


def measure(model_name: str, n: int, rounds: int, q: int, noise: str) -> dict:
    cfg = TrainConfig(
        mode="hosl", steps=n * rounds, batch_size=16, seed=0,
        model=ModelConfig(name=model_name, split_layer=4),
        data=DataConfig(task="rt", max_length=64),
        zo=ZoConfig(q=q, embedding_noise=noise),
        optim=OptimConfig(),
        clients=ClientsConfig(n=n),
    )
    train = load_examples("rt", "train", n=16 * cfg.steps * 2, seed=0)
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(model_name)
    run = federate(cfg, build_run(cfg, model), [ex.label for ex in train])
    for step in range(cfg.steps):
        idx = run.example_indices(len(train), step, cfg.batch_size, 1, cfg.seed)
        batches = [collate([train[i] for i in micro], tokenizer, 64) for micro in idx]
        run.train_step(batches, step)
    report = run.report(cfg.steps, [ex.label for ex in train], None)
    stats = run.transport.stats.train
    return {
        "q": q, "embedding_noise": noise, "clients": n, "rounds": rounds,
        "record_bytes_mean": report["log_bytes"] / report["log_records"],
        "sync_bytes_per_client_round": report["sync_bytes_per_client_round"],
        "fedavg_bytes_per_client_round": report["fedavg_bytes_per_client_round"],
        "fedavg_over_sync": report["fedavg_bytes_per_client_round"]
        / report["sync_bytes_per_client_round"],
        "activation_bytes_per_step": stats.wire_bytes / cfg.steps,
    }


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Many clients: record sync bytes beside FedAvg",
        "",
        f"`python benchmarks/many_clients.py` on {m['cpu']} ({m['cores']} cores), "
        f"torch {m['torch']}; model {result['model']}, split at 4, batch 16, length 64, rt, "
        f"{result['rows'][0]['clients']} clients, {result['rows'][0]['rounds']} rounds.",
        "",
        "| Q | embedding noise | bytes / record | sync bytes / client / round | "
        "FedAvg bytes / client / round | FedAvg ÷ sync | activation bytes / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['q']} | {r['embedding_noise']} | {r['record_bytes_mean']:,.0f} | "
            f"{r['sync_bytes_per_client_round']:,.0f} | {r['fedavg_bytes_per_client_round']:,} | "
            f"{r['fedavg_over_sync']:,.0f}× | {r['activation_bytes_per_step']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = [
        measure(args.model, args.clients, args.rounds, q, noise)
        for q in (1, 4) for noise in ("all", "batch")
    ]
    result = {"model": args.model, "rows": rows, "machine": machine()}
    out = ROOT / "results" / "many_clients"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
