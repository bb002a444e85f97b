"""`hosl.evaluation.evaluate` batches examples by length and reports them in their own order: the
same predictions and (to float rounding) the same scores as one example at a time, fewer padded
tokens than file order, and the predictions file in file order."""

from __future__ import annotations

import json
import random

import torch

from conftest import NEUTRAL, POSITIVE, Ex, tiny_llama
from hosl.batching import Batch, collate
from hosl.build import build_run
from hosl.config import DataConfig, ModelConfig, TrainConfig
from hosl.evaluation import evaluate, length_order


def _mixed_lengths(n: int) -> list[Ex]:
    """Prompts of 1 to 12 words in a shuffled order: file order pads far more than length order."""
    rng = random.Random(3)
    examples = []
    for i in range(n):
        words = [rng.choice(POSITIVE + NEUTRAL) for _ in range(1 + (7 * i) % 12)]
        examples.append(Ex(" ".join(words) + " It was", (" terrible", " great"), i % 2))
    rng.shuffle(examples)
    return examples


def test_length_order_gives_file_order_scores_with_less_padding(tokenizer, tmp_path) -> None:
    examples = _mixed_lengths(24)
    run = build_run(TrainConfig(mode="zo-full", model=ModelConfig(name="tiny", split_layer=0),
                                data=DataConfig(task="sst2")), tiny_llama())
    seen: list[Batch] = []

    def scores(batch: Batch) -> torch.Tensor:
        seen.append(batch)
        return run.scores(batch)

    path = tmp_path / "predictions.jsonl"
    accuracy = evaluate(scores, examples, tokenizer, batch_size=5, max_length=32,
                        predictions_path=path)
    records = [json.loads(line) for line in path.read_text().splitlines()]

    # one at a time: no neighbour, no padding
    alone = [run.scores(_one(ex, tokenizer))[0] for ex in examples]
    assert [r["index"] for r in records] == list(range(len(examples)))  # the file's order
    assert [r["label"] for r in records] == [ex.label for ex in examples]
    for record, want in zip(records, alone):
        assert record["prediction"] == int(want.argmax())
        assert max(abs(a - b) for a, b in zip(record["scores"], want.tolist())) < 1e-5
    assert accuracy == sum(r["prediction"] == r["label"] for r in records) / len(examples)

    # batched shortest first: fewer padded tokens than the same batches in file order
    lengths = [int(b.attention_mask.sum(1).max()) for b in seen]
    assert lengths == sorted(lengths)
    padded = sum(b.input_ids.numel() for b in seen)
    in_file_order = sum(
        _batch(examples[at:at + 5], tokenizer).input_ids.numel() for at in range(0, 24, 5))
    assert padded < 0.8 * in_file_order, (padded, in_file_order)


def test_length_order_is_shortest_first_in_tokens_with_ties_in_file_order(tokenizer) -> None:
    words = ["good movie", "good", "the plot was dull", "good film", "a", "dull dull dull dull"]
    examples = [Ex(w, (" great", " terrible movie"), 0) for w in words]
    # <s>, the prompt's words and the longest candidate's but its last (read, never input):
    # 4, 3, 6, 4, 3, 6 tokens; cut to at most 5, then 4, the longest become ties (file order)
    assert length_order(examples, tokenizer, max_length=32) == [1, 4, 0, 3, 2, 5]
    assert length_order(examples, tokenizer, max_length=5) == [1, 4, 0, 3, 2, 5]
    assert length_order(examples, tokenizer, max_length=4) == [1, 4, 0, 2, 3, 5]


def _batch(chunk: list[Ex], tokenizer) -> Batch:
    return collate(chunk, tokenizer, 32, "right")


def _one(ex: Ex, tokenizer) -> Batch:
    return _batch([ex], tokenizer)
