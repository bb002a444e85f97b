"""How much of a hosl client update points along the true gradient, with the embedding's noise on
every row (`zo.embedding_noise all`, the paper's) or on the rows the batch looks up (`batch`).

    python benchmarks/embedding_noise.py [--batches 8] [--q 4]

On the demo model (SmolLM2-135M split at k = 4: 42.5M client parameters, 28.3M of them the token
embedding), for each of `--batches` batches of 8 `rt` training examples (max_length 64):

1. the true client gradient ∇θ_c L, by backpropagation through the split model (the FO-FO split
   gradient, which equals the centralized one: tests/test_split_gradients.py);
2. one real hosl step of each noise mode from the same θ_c with the same seeds (`Run.train_step`,
   the server's rate 0 so every step starts from the same model), read back as the applied update
   Δθ_c = θ_c' − θ_c = −lr · (1/Q) Σ g_q z_q.

Reported per mode: cos(−Δθ_c, ∇θ_c L) over the whole client and over its non-embedding tensors,
the share of ‖Δθ_c‖² on embedding rows the batch never looked up (where the true gradient is 0,
so pure noise), and the seconds of a step. The two modes draw the same z on every looked-up row
and every other tensor, so their g_q agree and the cosines differ only by the noise `all` adds on
unused rows: a single-direction estimate has cos ≈ |N(0, 1)| / √d over the d noised parameters,
so the expected ratio is √(d_all / d_batch).

Writes benchmarks/results/embedding_noise.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from machine_info import finish, machine, run_lines

from hosl.algos.split_modes import cut
from hosl.batching import Batch, collate
from hosl.build import Run, build_run
from hosl.config import ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.models.loading import load_pretrained
from hosl.protocol import FoStepRequest
from hosl.tasks import load_examples

MODEL, SPLIT, BATCH, MAX_LENGTH, TASK = "smollm2-135m", 4, 8, 64, "rt"
ZO_LR = 1e-4  # large enough that Δθ_c = θ_c' − θ_c is read back well above float32 rounding
MODES = ("all", "batch")
ROOT = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_run(model: torch.nn.Module, noise: str, q: int) -> Run:
    cfg = TrainConfig(
        mode="hosl", batch_size=BATCH, model=ModelConfig(name=MODEL, split_layer=SPLIT),
        zo=ZoConfig(q=q, lr=ZO_LR, embedding_noise=noise),
        optim=OptimConfig(lr=0.0),  # the server stays put: every step starts from one model
    )
    return build_run(cfg, copy.deepcopy(model))


def true_gradient(run: Run, batch: Batch) -> dict[str, torch.Tensor]:
    """∇θ_c L on `batch`: the server's ∂L/∂h, backpropagated through the client."""
    client = run.client
    assert client is not None and run.transport is not None
    acts = client.forward_with_graph(batch)
    reply = run.transport.fo_step(FoStepRequest(step=0, micro=0, update=False, batch=cut(batch),
                                                hidden=acts.hidden.detach()))
    client.backward(acts, reply.grad)
    grads = {n: p.grad.detach().clone() for n, p in client.part.named_parameters()
             if p.grad is not None}  # frozen tensors (the base under an adapter) have none
    client.part.zero_grad(set_to_none=True)
    if run.server is not None:
        run.server.part.zero_grad(set_to_none=True)
    return grads


def embedding_name(run: Run) -> str:
    """The client's token embedding: its one (V, d) matrix looked up by input ids."""
    assert run.client is not None
    for name, module in run.client.part.named_modules():
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings > 10_000:
            return f"{name}.weight"
    raise LookupError("no token embedding in the client")


def cosine(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    dot = sum(float((a.double() * b.double()).sum()) for a, b in pairs)
    na = sum(float(a.double().square().sum()) for a, _ in pairs) ** 0.5
    nb = sum(float(b.double().square().sum()) for _, b in pairs) ** 0.5
    return dot / (na * nb)


def one_step(run: Run, start: dict[str, torch.Tensor], batch: Batch, step: int
             ) -> tuple[dict[str, torch.Tensor], float]:
    """Δθ_c of one hosl step from `start`, and the step's seconds; θ_c is put back after."""
    assert run.client is not None
    params = dict(run.client.part.named_parameters())
    began = time.perf_counter()
    run.train_step([batch], step)
    seconds = time.perf_counter() - began
    with torch.no_grad():
        delta = {n: params[n].detach() - start[n] for n in start}
        for n in start:  # the trainable tensors: only they move
            params[n].copy_(start[n])
    return delta, seconds


def measure(batches: int, q: int) -> dict[str, Any]:
    model, tokenizer = load_pretrained(MODEL, dtype=torch.float32)
    examples = load_examples(TASK, "train", n=BATCH * batches, seed=0)
    runs = {noise: make_run(model, noise, q) for noise in MODES}
    del model
    ref = runs["all"]
    assert ref.client is not None
    emb = embedding_name(ref)
    start = {n: p.detach().clone() for n, p in ref.client.part.named_parameters()}
    sizes = {n: p.numel() for n, p in start.items()}
    rows: list[dict[str, Any]] = []
    for b in range(batches):
        batch = collate(examples[b * BATCH:(b + 1) * BATCH], tokenizer, MAX_LENGTH, "right")
        grad = true_gradient(ref, batch)
        used = torch.zeros(start[emb].shape[0], dtype=torch.bool)
        used[batch.input_ids.unique()] = True
        row: dict[str, Any] = {"index": b, "looked_up_rows": int(used.sum()),
                               "tokens": list(batch.input_ids.shape)}
        for noise, run in runs.items():
            delta, seconds = one_step(run, start, batch, step=b)
            descent = {n: -d for n, d in delta.items()}
            unused_sq = float(descent[emb][~used].double().square().sum())
            total_sq = sum(float(d.double().square().sum()) for d in descent.values())
            row[noise] = {
                "cos": cosine([(descent[n], grad[n]) for n in start]),
                "cos_rest": cosine([(descent[n], grad[n]) for n in start if n != emb]),
                "unused_share": unused_sq / total_sq,
                "seconds": seconds,
            }
            log(f"batch {b} {noise}: cos {row[noise]['cos']:.3e}, "
                f"non-embedding cos {row[noise]['cos_rest']:.3e}, "
                f"unused-row share {row[noise]['unused_share']:.3f}, {seconds:.1f} s")
        rows.append(row)
    d_all = sum(sizes.values())
    mean_rows = statistics.mean(r["looked_up_rows"] for r in rows)
    d_batch = d_all - sizes[emb] + mean_rows * start[emb].shape[1]
    return {"rows": rows, "client_parameters": d_all, "embedding": emb,
            "embedding_parameters": sizes[emb], "mean_looked_up_rows": mean_rows,
            "expected_ratio": (d_all / d_batch) ** 0.5}


def summarise(m: dict[str, Any]) -> dict[str, Any]:
    rows = m["rows"]
    out: dict[str, Any] = {}
    for noise in MODES:
        out[noise] = {k: statistics.mean(r[noise][k] for r in rows)
                      for k in ("cos", "cos_rest", "unused_share")}
        out[noise]["median_seconds"] = statistics.median(r[noise]["seconds"] for r in rows)
    out["cos_ratio_median"] = statistics.median(r["batch"]["cos"] / r["all"]["cos"] for r in rows)
    out["same_sign_share"] = statistics.mean(
        (r["batch"]["cos"] > 0) == (r["all"]["cos"] > 0) for r in rows)
    return out


def write_markdown(result: dict[str, Any]) -> str:
    m, s = result["measurements"], result["summary"]
    lines = [
        "# Embedding noise: every row (`all`) or the batch's rows (`batch`)", "",
        *run_lines(result),
        f"- Command: `{result['command']}`",
        f"- Settings: {MODEL} split at k = {SPLIT} ({m['client_parameters']:,} client "
        f"parameters, {m['embedding_parameters']:,} of them `{m['embedding']}`), "
        f"{len(m['rows'])} batches of {BATCH} `{TASK}` training examples (max_length "
        f"{MAX_LENGTH}), Q = {result['settings']['q']}, client rate {ZO_LR}, server rate 0; a "
        f"batch looks up {m['mean_looked_up_rows']:.0f} embedding rows on average.", "",
        "| noise | cos(−Δθ_c, ∇) | cos, non-embedding tensors | ‖Δθ_c‖² on unused rows | "
        "s/step (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for noise in MODES:
        n = s[noise]
        lines.append(f"| {noise} | {n['cos']:.3e} | {n['cos_rest']:.3e} | "
                     f"{n['unused_share']:.1%} | {n['median_seconds']:.1f} |")
    lines += [
        "",
        "Median ratio of the cosines (batch ÷ all), batch by batch: "
        f"**{s['cos_ratio_median']:.2f}**"
        f" (expected √(d_all / d_batch) = {m['expected_ratio']:.2f}); the two modes' cosines have "
        f"the same sign on {s['same_sign_share']:.0%} of batches (their g_q agree: the noise on "
        "looked-up rows and on every other tensor is the same).", "",
        "| batch | rows looked up | cos all | cos batch | ratio |", "|---:|---:|---:|---:|---:|",
    ]
    for r in m["rows"]:
        lines.append(f"| {r['index']} | {r['looked_up_rows']} | {r['all']['cos']:.3e} | "
                     f"{r['batch']['cos']:.3e} | {r['batch']['cos'] / r['all']['cos']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--q", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="rewrite the markdown of a saved embedding_noise.json")
    args = parser.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        (args.out / "embedding_noise.md").write_text(write_markdown(result))
        return 0
    torch.set_num_threads(args.threads)
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    started, load_start = time.perf_counter(), round(os.getloadavg()[0], 1)
    result: dict[str, Any] = {
        "machine": machine(), "date": datetime.date.today().isoformat(), "command": command,
        "settings": {"model": MODEL, "split_layer": SPLIT, "batch": BATCH, "task": TASK,
                     "max_length": MAX_LENGTH, "q": args.q, "zo_lr": ZO_LR,
                     "batches": args.batches},
    }
    result["measurements"] = measure(args.batches, args.q)
    result["summary"] = summarise(result["measurements"])
    finish(result, started, load_start, args.out, "embedding_noise", write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
