"""How much of a ZO client's update points along its true gradient, by the client's dimension d_c
and the number of directions Q: the signal behind the client_share and lora studies.

    python benchmarks/client_signal.py [--split 24] [--qs 1 4] [--batches 4]

A ZO update −lr · (1/Q) Σ_q g_q z_q with z_q ~ N(0, I) in d dimensions has, for d ≫ Q, a cosine
with the true gradient of about √(Q / d): the rest of it is noise. A client of 113M parameters
(SmolLM2-135M at k = 24) therefore moves almost orthogonally to its gradient at every step, and a
LoRA client (rank 8 on q and v: under 1M parameters) has a >10x larger share of signal.

For each of `--batches` batches of 8 `rt` training examples (max_length 64), on the real model split
at `--split`, and for each client (`full`: every client parameter, row-sparse embedding noise, the
hosl default; `lora`: the adapters alone) and each Q in `--qs`:

1. the true gradient of the client's trainable parameters, by backpropagation through the split
   model (FO-FO split gradients equal the centralized ones: tests/test_split_gradients.py);
2. one real hosl step (`Run.train_step`, the cut-gradient estimator, which reads each g_q from one
   ∂L/∂h and equals the paper's loss differences to O(ε²); the server's rate 0, so every step
   starts from the same model), read back as Δθ_c = θ_c' − θ_c.

Reported: cos(−Δθ_c, ∇) per configuration (mean over batches, and the share of batches where it is
positive: a client update with the wrong sign reads negative), the prediction √(Q / d) with d the
parameters the step perturbs (the full client's embedding rows the batch did not look up are not
perturbed), and seconds per step. For LoRA, also the share of ‖∇‖² on the B matrices: B starts at
zero, so the true gradient of every A matrix is exactly zero at the start and half the adapters'
directions are pure noise until B moves.

Writes benchmarks/results/client_signal.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from embedding_noise import cosine, one_step, true_gradient
from machine_info import finish, machine, run_lines

from hosl.batching import collate
from hosl.build import Run, build_run
from hosl.config import ClientConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.models.loading import load_pretrained
from hosl.tasks import load_examples

MODEL, BATCH, MAX_LENGTH, TASK = "smollm2-135m", 8, 64, "rt"
ZO_LR = 1e-4  # large enough that Δθ_c = θ_c' − θ_c is read back well above float32 rounding
CLIENTS = ("full", "lora")
ROOT = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_run(model: torch.nn.Module, client: str, split: int, q: int) -> Run:
    cfg = TrainConfig(
        mode="hosl", batch_size=BATCH, model=ModelConfig(name=MODEL, split_layer=split),
        data=DataConfig(max_length=MAX_LENGTH),
        zo=ZoConfig(q=q, lr=ZO_LR, estimator="cut-grad"),
        client=ClientConfig(adapter="lora" if client == "lora" else "none"),
        optim=OptimConfig(lr=0.0),  # the server stays put: every step starts from one model
    )
    return build_run(cfg, copy.deepcopy(model))


def trainable(run: Run) -> dict[str, torch.Tensor]:
    assert run.client is not None
    return {n: p.detach().clone() for n, p in run.client.part.named_parameters()
            if p.requires_grad}


def perturbed_dimension(start: dict[str, torch.Tensor], rows_used: int) -> int:
    """Parameters a step perturbs: every trainable one, except a (V, d) embedding's rows the
    batch does not look up (row-sparse noise)."""
    d = 0
    for name, p in start.items():
        if name.endswith("embed_tokens.weight"):
            d += rows_used * p.shape[1]
        else:
            d += p.numel()
    return d


def measure(split: int, qs: list[int], batches: int) -> dict[str, Any]:
    model, tokenizer = load_pretrained(MODEL, dtype=torch.float32)
    examples = load_examples(TASK, "train", n=BATCH * batches, seed=0)
    configs = {(client, q): make_run(model, client, split, q) for client in CLIENTS for q in qs}
    del model
    starts = {key: trainable(run) for key, run in configs.items()}
    rows: list[dict[str, Any]] = []
    for b in range(batches):
        batch = collate(examples[b * BATCH:(b + 1) * BATCH], tokenizer, MAX_LENGTH, "right")
        used = int(batch.input_ids.unique().numel())
        row: dict[str, Any] = {"index": b, "looked_up_rows": used}
        grads = {}
        for client in CLIENTS:  # one true gradient per client kind, shared by its Qs
            run = configs[(client, qs[0])]
            grads[client] = {n: g for n, g in true_gradient(run, batch).items()
                             if n in starts[(client, qs[0])]}
        for (client, q), run in configs.items():
            start, grad = starts[(client, q)], grads[client]
            delta, seconds = one_step(run, start, batch, step=b)
            d = perturbed_dimension(start, used)
            entry = {
                "cos": cosine([(-delta[n], grad[n]) for n in start]),
                "predicted": (q / d) ** 0.5,
                "d": d,
                "seconds": seconds,
            }
            if client == "lora":
                b_sq = sum(float(grad[n].double().square().sum()) for n in start
                           if "lora_B" in n)
                all_sq = sum(float(g.double().square().sum()) for g in grad.values())
                entry["grad_share_on_B"] = b_sq / all_sq
            row[f"{client} Q={q}"] = entry
            log(f"batch {b} {client} Q={q}: cos {entry['cos']:.3e} "
                f"(√(Q/d) = {entry['predicted']:.3e}, d = {d:,}), {seconds:.1f} s")
        rows.append(row)
    return {"rows": rows, "configs": [f"{c} Q={q}" for c, q in configs]}


def summarise(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in m["configs"]:
        entries = [r[name] for r in m["rows"]]
        out[name] = {
            "cos_mean": statistics.mean(e["cos"] for e in entries),
            "positive_share": statistics.mean(e["cos"] > 0 for e in entries),
            "predicted": statistics.mean(e["predicted"] for e in entries),
            "d": statistics.mean(e["d"] for e in entries),
            "median_seconds": statistics.median(e["seconds"] for e in entries),
        }
        if "grad_share_on_B" in entries[0]:
            out[name]["grad_share_on_B"] = statistics.mean(e["grad_share_on_B"] for e in entries)
    return out


def write_markdown(result: dict[str, Any]) -> str:
    s, settings = result["summary"], result["settings"]
    lines = [
        "# ZO client signal: cos(update, true gradient) by client dimension and Q", "",
        *run_lines(result, shared=True),
        f"- Command: `{result['command']}`",
        f"- Settings: {MODEL} split at k = {settings['split_layer']}, "
        f"{settings['batches']} batches of {BATCH} `{TASK}` training examples (max_length "
        f"{MAX_LENGTH}), the cut-gradient estimator, ε = 1e-3, client rate {ZO_LR}, server rate 0;"
        " `full`: every client parameter (row-sparse embedding noise); `lora`: rank-8 adapters "
        "on q and v, nothing else trains.", "",
        "| client, Q | d (perturbed) | cos(−Δθ_c, ∇), mean | √(Q/d) | positive | s/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, n in s.items():
        lines.append(f"| {name} | {n['d']:,.0f} | {n['cos_mean']:.2e} | {n['predicted']:.2e} | "
                     f"{n['positive_share']:.0%} | {n['median_seconds']:.1f} |")
    shares = [n["grad_share_on_B"] for n in s.values() if "grad_share_on_B" in n]
    if shares:
        lines += ["", f"LoRA: {statistics.mean(shares):.1%} of ‖∇‖² is on the B matrices (B starts"
                  " at zero, so the gradient of every A is zero at the start)."]
    lines += ["", "| batch | " + " | ".join(s) + " |", "|---:|" + "---:|" * len(s)]
    for r in result["measurements"]["rows"]:
        lines.append(f"| {r['index']} | " + " | ".join(f"{r[name]['cos']:.2e}" for name in s)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=int, default=24)
    parser.add_argument("--qs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    started, load_start = time.perf_counter(), round(os.getloadavg()[0], 1)
    result: dict[str, Any] = {
        "machine": machine(), "date": datetime.date.today().isoformat(), "command": command,
        "settings": {"model": MODEL, "split_layer": args.split, "batch": BATCH, "task": TASK,
                     "max_length": MAX_LENGTH, "qs": args.qs, "zo_lr": ZO_LR,
                     "batches": args.batches},
    }
    result["measurements"] = measure(args.split, args.qs, args.batches)
    result["summary"] = summarise(result["measurements"])
    finish(result, started, load_start, args.out, "client_signal", write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
