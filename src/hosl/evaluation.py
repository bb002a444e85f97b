"""Accuracy and per-example predictions, through the same parties as training."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hosl.batching import Batch, ExampleLike, Tokenizer, collate


def length_order(examples: Sequence[ExampleLike], tokenizer: Tokenizer, max_length: int,
                 padding_side: str = "right") -> list[int]:
    """The order examples are evaluated in: shortest first by the tokens of each one's own batch
    (its longest candidate row, after truncation), ties in file order.

    A batch pads to its longest sequence, so batches of neighbours in length pad little: on the
    1000-example `rt` test block (SmolLM2's tokenizer, batches of 8, at most 64 tokens) the padded
    batches hold 1.65x fewer tokens than in file order (benchmarks/eval_order.py; ordering by
    characters instead gave 1.39x). Causal attention under the mask never reads a pad, so each
    example's scores are the same numbers up to float rounding, whichever neighbours it is
    batched with. Tokenizing every example once more costs little beside its forward pass."""
    lengths = [collate([ex], tokenizer, max_length, padding_side)  # type: ignore[list-item]
               .input_ids.shape[1] for ex in examples]
    return sorted(range(len(examples)), key=lengths.__getitem__)


def evaluate(
    scores_fn: Callable[[Batch], torch.Tensor],
    examples: Sequence[ExampleLike],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_length: int,
    padding_side: str = "right",
    predictions_path: Path | None = None,
) -> float:
    """Accuracy over `examples`, batched by length (`length_order`); optionally one JSON line
    per example, in the examples' own order, to `predictions_path`."""
    correct = 0
    records: dict[int, str] = {}
    order = length_order(examples, tokenizer, max_length, padding_side)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        chunk = [examples[i] for i in indices]
        batch = collate(chunk, tokenizer, max_length, padding_side)  # type: ignore[arg-type]
        scores = scores_fn(batch)                                     # (B, C)
        preds = scores.argmax(dim=-1)
        for row, (index, ex) in enumerate(zip(indices, chunk)):
            pred = int(preds[row])
            correct += int(pred == ex.label)
            if predictions_path is not None:
                # A user's file: its own record number (and line); else the position evaluated.
                source = getattr(ex, "source_index", None)
                record = {
                    "index": index if source is None else source,
                    "scores": [round(float(s), 6) for s in scores[row]],
                    "prediction": pred, "label": ex.label,
                }
                if getattr(ex, "source_line", None) is not None:
                    record["line"] = ex.source_line
                records[index] = json.dumps(record)
    if predictions_path is not None:
        lines = [records[i] for i in range(len(examples))]
        predictions_path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return correct / max(1, len(examples))
