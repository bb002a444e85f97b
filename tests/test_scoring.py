"""Candidate batches and scores: positions, padding, multi-token candidates, no (S × L × V)."""

from __future__ import annotations

import pytest
import torch

from conftest import Ex, sentiment_examples, tiny_llama
from hosl.batching import collate
from hosl.models.split import split_model, unsplit_model
from hosl.scoring import candidate_scores


def _reference_scores(model, tokenizer, ex: Ex) -> list[float]:
    """Score each candidate the slow, obvious way: full logits of prompt + candidate, unpadded."""
    out = []
    prompt = tokenizer(ex.prompt)["input_ids"]
    for cand in ex.candidates:
        ids = tokenizer(cand, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([prompt + ids])
        with torch.no_grad():
            logp = model(seq).logits.log_softmax(-1)[0]
        reads = [logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(ids)]
        out.append(float(sum(reads) / len(reads)))
    return out


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_scores_match_full_logits_single_and_multi_token(tokenizer, padding_side) -> None:
    model = tiny_llama()
    part = unsplit_model(model)
    single = sentiment_examples(3, seed=5)
    multi = [
        Ex("good film It was", (" great movie", " awful"), 0),
        Ex("a dull plot and the cast It was", (" terrible", " fine and bright"), 1),
    ]
    for examples in (single, multi):
        batch = collate(examples, tokenizer, max_length=32, padding_side=padding_side)
        with torch.no_grad():
            scores = candidate_scores(
                part(batch.input_ids, batch.attention_mask), part.head, batch.spec
            )
        expected = torch.tensor([_reference_scores(model, tokenizer, ex) for ex in examples])
        torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert collate(single, tokenizer, 32).input_ids.shape[0] == 3  # one sequence per example
    assert collate(multi, tokenizer, 32).input_ids.shape[0] == 4  # one per candidate


def test_head_never_sees_every_position(tokenizer) -> None:
    """The head's output has one row per scored position, never S × L rows."""
    model = tiny_llama()
    _, server = split_model(model, 1)
    client, _ = split_model(model, 1)
    examples = sentiment_examples(4)
    batch = collate(examples, tokenizer, max_length=32)
    shapes: list[tuple[int, ...]] = []
    handle = server.head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        candidate_scores(
            server(client(batch.input_ids, batch.attention_mask)), server.head, batch.spec
        )
    handle.remove()
    seq, length = batch.input_ids.shape
    assert shapes == [(seq, model.config.vocab_size)]
    assert length > 1 and shapes[0][0] < seq * length


def test_left_truncation_keeps_the_answer_cue(tokenizer) -> None:
    ex = Ex("good " * 40 + "It was", (" terrible", " great"), 1)
    batch = collate([ex], tokenizer, max_length=8)
    ids = batch.input_ids[0].tolist()
    assert len(ids) == 8
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["It", "was"]
    assert ids[0] == tokenizer.bos_token_id
