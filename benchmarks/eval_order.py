"""What evaluating in length order saves: padded tokens and seconds, with the same predictions.

    python benchmarks/eval_order.py [--examples 1000] [--repeats 2]

A batch pads every sequence to its longest, so a random eight of the `rt` test block pad to
about the longest review among them. `hosl.evaluation.evaluate` batches examples shortest first
(`length_order`: by the tokens of each example's own batch). On the real demo model
(SmolLM2-135M, whole, in process), the seed-0 test block, batches of 8 and at most 64 tokens
(the studies' shapes), this compares three orders:

- `file`: the examples as they come (what evaluation did before);
- `tokens`: `length_order`, what it does now;
- `characters`: by characters of the prompt and its longest candidate (a proxy that needs no
  tokenizer: how much exact lengths are worth).

Reported per order: the tokens of the padded batches (rows × longest, summed; every candidate
row counts) and the seconds an evaluation takes (orders interleaved, `--repeats` times, the
median); and, against `file`, the accuracy and the largest difference of any example's score
(float rounding of other batch shapes: the pads are masked out). Writes
benchmarks/results/eval_order.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from machine_info import finish, machine, run_lines

from hosl.batching import Batch, collate
from hosl.build import build_run
from hosl.config import ModelConfig, TrainConfig
from hosl.evaluation import length_order
from hosl.models.loading import load_pretrained
from hosl.tasks import load_examples

MODEL, TASK, BATCH, MAX_LENGTH = "smollm2-135m", "rt", 8, 64
ROOT = Path(__file__).resolve().parent


def scores_in(order: Sequence[int], examples: list, tokenizer: Any,
              scores_fn: Callable[[Batch], torch.Tensor]) -> tuple[torch.Tensor, int, float]:
    """(N, C) scores in the examples' own order, padded tokens, seconds: one pass in `order`."""
    out: list[torch.Tensor | None] = [None] * len(examples)
    tokens, start = 0, time.perf_counter()
    for at in range(0, len(order), BATCH):
        indices = order[at:at + BATCH]
        batch = collate([examples[i] for i in indices], tokenizer, MAX_LENGTH, "right")
        tokens += batch.input_ids.numel()  # (rows, longest): what the forward computes
        scores = scores_fn(batch)  # (B, C)
        for row, i in enumerate(indices):
            out[i] = scores[row]
    seconds = time.perf_counter() - start
    return torch.stack(out), tokens, seconds  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    started, load_start = time.perf_counter(), round(os.getloadavg()[0], 1)

    model, tokenizer = load_pretrained(MODEL)
    run = build_run(TrainConfig(mode="zo-full", model=ModelConfig(name=MODEL, split_layer=0)),
                    model)
    examples = load_examples(TASK, "test", n=args.examples, seed=0)
    orders = {
        "file": list(range(len(examples))),
        "tokens": length_order(examples, tokenizer, MAX_LENGTH),
        "characters": sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + max(
            len(c) for c in examples[i].candidates)),
    }
    labels = torch.tensor([ex.label for ex in examples])
    seconds: dict[str, list[float]] = {name: [] for name in orders}
    rows: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for repeat in range(args.repeats):
            for name, order in orders.items():  # interleaved: load drifts hit every order
                scores, tokens, took = scores_in(order, examples, tokenizer, run.scores)
                seconds[name].append(took)
                rows[name] = {"tokens": tokens, "scores": scores}
                print(f"repeat {repeat + 1}: {name}: {tokens} tokens, {took:.1f} s", flush=True)
    reference = rows["file"]["scores"]
    result: dict[str, Any] = {
        "machine": machine(), "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(["benchmarks/eval_order.py", *sys.argv[1:]]),
        "examples": len(examples), "batch": BATCH, "max_length": MAX_LENGTH,
        "mean_tokens_per_example": round(sum(
            collate([ex], tokenizer, MAX_LENGTH, "right").input_ids.shape[1] for ex in examples)
            / len(examples), 1),
        "orders": {},
    }
    for name in orders:
        scores = rows[name]["scores"]
        result["orders"][name] = {
            "padded_tokens": rows[name]["tokens"],
            "seconds": round(statistics.median(seconds[name]), 1),
            "accuracy": round((scores.argmax(-1) == labels).float().mean().item(), 4),
            "max_score_difference": (scores - reference).abs().max().item(),
            "same_predictions": bool(torch.equal(scores.argmax(-1), reference.argmax(-1))),
        }
    finish(result, started, load_start, args.out, "eval_order", markdown)


def markdown(r: dict[str, Any]) -> str:
    file = r["orders"]["file"]
    lines = [
        "# Evaluation in length order",
        "",
        f"SmolLM2-135M (whole, in process), the seed-0 `rt` test block: {r['examples']} examples "
        f"({r['mean_tokens_per_example']} tokens each on average), batches of {r['batch']}, at "
        f"most {r['max_length']} tokens. Command: `{r['command']}`.",
        "",
        "| order | padded tokens | ÷ file order | s per evaluation | speed-up | accuracy | "
        "largest score difference | same predictions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, o in r["orders"].items():
        lines.append(
            f"| {name} | {o['padded_tokens']} | {file['padded_tokens'] / o['padded_tokens']:.2f}x"
            f" | {o['seconds']} | {file['seconds'] / o['seconds']:.2f}x | {o['accuracy']} | "
            f"{o['max_score_difference']:.1e} | {'yes' if o['same_predictions'] else 'no'} |"
        )
    lines += ["", *run_lines(r, shared=True), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
