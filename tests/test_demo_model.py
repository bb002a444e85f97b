"""The real offline demo model (SmolLM2-135M) on the offline Rotten Tomatoes task."""

from __future__ import annotations

import pytest
import torch

from hosl.build import build_run
from hosl.config import ModelConfig, TrainConfig
from hosl.evaluation import evaluate, length_order
from hosl.models.loading import load_pretrained
from hosl.tasks import load_examples


@pytest.mark.slow
def test_zero_shot_above_chance_and_split_equals_unsplit(tmp_path) -> None:
    model, tokenizer = load_pretrained("smollm2-135m")
    examples = load_examples("rt", "test", n=200, seed=0)

    accuracies, scores = {}, {}
    for mode, k in (("zo-full", 0), ("zo", 4)):
        run = build_run(TrainConfig(mode=mode, model=ModelConfig(split_layer=k)), model)
        batches: list[torch.Tensor] = []

        def record(batch, run=run, batches=batches):
            out = run.scores(batch)
            batches.append(out)
            return out

        accuracies[mode] = evaluate(record, examples, tokenizer, batch_size=20, max_length=64)
        by_example = torch.empty(len(examples), 2)
        # the batches came shortest first
        by_example[length_order(examples, tokenizer, max_length=64)] = torch.cat(batches)
        scores[mode] = by_example
    # zero-shot: above chance, and the score margin ranks positive reviews above negative ones
    # far more often than not (the instruct model leans towards " great", so accuracy alone
    # is a weak signal)
    assert accuracies["zo-full"] > 0.5, accuracies
    margin = scores["zo-full"][:, 1] - scores["zo-full"][:, 0]
    pos = margin[[i for i, ex in enumerate(examples) if ex.label == 1]]
    neg = margin[[i for i, ex in enumerate(examples) if ex.label == 0]]
    auc = (pos[:, None] > neg[None, :]).float().mean().item()
    assert auc > 0.65, auc
    # the split model (through client, wire codec and server) scores exactly like the whole one
    torch.testing.assert_close(scores["zo"], scores["zo-full"], rtol=0, atol=1e-4)
    assert accuracies["zo"] == accuracies["zo-full"]
