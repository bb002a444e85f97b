"""Accuracy and per-example predictions, through the same parties as training."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hosl.batching import Batch, ExampleLike, Tokenizer, collate


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
    """Accuracy over `examples`; optionally one JSON line per example to `predictions_path`."""
    correct = 0
    lines: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate(chunk, tokenizer, max_length, padding_side)  # type: ignore[arg-type]
        scores = scores_fn(batch)                                     # (B, C)
        preds = scores.argmax(dim=-1)
        for i, ex in enumerate(chunk):
            pred = int(preds[i])
            correct += int(pred == ex.label)
            if predictions_path is not None:
                # A user's file: its own record number (and line); else the position evaluated.
                source = getattr(ex, "source_index", None)
                record = {
                    "index": start + i if source is None else source,
                    "scores": [round(float(s), 6) for s in scores[i]],
                    "prediction": pred, "label": ex.label,
                }
                if getattr(ex, "source_line", None) is not None:
                    record["line"] = ex.source_line
                lines.append(json.dumps(record))
    if predictions_path is not None:
        predictions_path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return correct / max(1, len(examples))
