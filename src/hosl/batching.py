"""Turn examples into token batches plus the recipe for scoring their candidates.

MeZO's "train as classification": each candidate answer is scored by the log-probability of its
tokens after the prompt, and the loss is cross-entropy across candidates. The recipe
(`ScoreSpec`) names exactly which positions' next-token distributions are needed, so the server
applies its output head there only, never to every position.

When every candidate in the batch is a single token (SST-2, RTE, BoolQ, ...), one sequence per
example suffices: all candidates are read off the distribution after the prompt's last token.
Otherwise (COPA, multi-token verbalizers) each (example, candidate) pair is its own sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from hosl.errors import DataError


class ExampleLike(Protocol):
    prompt: str
    candidates: tuple[str, ...]
    label: int


@dataclass
class ScoreSpec:
    """Which next-token log-probabilities make up each candidate's score.

    P unique positions, T (position, token) reads; candidate b*C + c scores the mean of its reads.
    """

    positions: Tensor  # (P,) long: flat index s * L + t into the (S, L) batch
    position_index: Tensor  # (T,) long: which of the P positions each read uses
    tokens: Tensor  # (T,) long: the token whose log-probability is read
    candidate_index: Tensor  # (T,) long: flat candidate b * C + c the read belongs to
    labels: Tensor  # (B,) long: index of the right candidate, -1 when unknown
    num_candidates: int  # C

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        return {
            "positions": self.positions,
            "position_index": self.position_index,
            "tokens": self.tokens,
            "candidate_index": self.candidate_index,
            "labels": self.labels,
        }


@dataclass
class Batch:
    input_ids: Tensor  # (S, L) long
    attention_mask: Tensor  # (S, L) long, 1 = real token
    spec: ScoreSpec


class Tokenizer(Protocol):
    pad_token_id: int | None
    bos_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = ...) -> dict: ...


def _ids(tokenizer: Tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _truncate_left(prompt: list[int], budget: int, bos: int | None) -> list[int]:
    """Keep the prompt's end (where the question and answer cue sit), and its BOS if it has one."""
    if len(prompt) <= budget:
        return prompt
    if bos is not None and prompt and prompt[0] == bos:
        return [bos] + prompt[len(prompt) - budget + 1 :]
    return prompt[len(prompt) - budget :]


def collate(
    examples: Sequence[ExampleLike],
    tokenizer: Tokenizer,
    max_length: int,
    padding_side: Literal["left", "right"] = "right",
) -> Batch:
    """Tokenize a list of examples into one padded batch and its score recipe."""
    if not examples:
        raise DataError("cannot build a batch from zero examples")
    num_candidates = len(examples[0].candidates)
    if any(len(ex.candidates) != num_candidates for ex in examples):
        raise DataError("all examples in a batch must have the same number of candidates")
    cand_ids = [[_ids(tokenizer, c, special=False) for c in ex.candidates] for ex in examples]
    if any(not ids for per_ex in cand_ids for ids in per_ex):
        raise DataError("a candidate answer tokenized to zero tokens")
    shared = all(len(ids) == 1 for per_ex in cand_ids for ids in per_ex)

    sequences: list[list[int]] = []
    # reads[s] = list of (column in the unpadded sequence, token, flat candidate index)
    reads: list[list[tuple[int, int, int]]] = []
    for b, ex in enumerate(examples):
        prompt = _ids(tokenizer, ex.prompt, special=True)
        if shared:
            prompt = _truncate_left(prompt, max_length, tokenizer.bos_token_id)
            last = len(prompt) - 1
            sequences.append(prompt)
            reads.append(
                [(last, ids[0], b * num_candidates + c) for c, ids in enumerate(cand_ids[b])]
            )
            continue
        for c, ids in enumerate(cand_ids[b]):
            budget = max_length - (len(ids) - 1)
            if budget < 1:
                raise DataError(
                    f"a candidate of {len(ids)} tokens does not fit max_length={max_length}"
                )
            head = _truncate_left(prompt, budget, tokenizer.bos_token_id)
            sequences.append(head + ids[:-1])
            start = len(head) - 1  # the position whose next token is the candidate's first token
            reads.append([(start + j, tok, b * num_candidates + c) for j, tok in enumerate(ids)])

    length = max(len(seq) for seq in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    positions: list[int] = []
    position_index: list[int] = []
    tokens: list[int] = []
    candidate_index: list[int] = []
    for s, (seq, seq_reads) in enumerate(zip(sequences, reads)):
        offset = length - len(seq) if padding_side == "left" else 0
        input_ids[s, offset : offset + len(seq)] = torch.tensor(seq)
        attention_mask[s, offset : offset + len(seq)] = 1
        seen: dict[int, int] = {}
        for col, tok, cand in seq_reads:
            flat = s * length + offset + col
            if flat not in seen:
                seen[flat] = len(positions)
                positions.append(flat)
            position_index.append(seen[flat])
            tokens.append(tok)
            candidate_index.append(cand)
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    spec = ScoreSpec(
        positions=torch.tensor(positions, dtype=torch.long),
        position_index=torch.tensor(position_index, dtype=torch.long),
        tokens=torch.tensor(tokens, dtype=torch.long),
        candidate_index=torch.tensor(candidate_index, dtype=torch.long),
        labels=labels,
        num_candidates=num_candidates,
    )
    return Batch(input_ids=input_ids, attention_mask=attention_mask, spec=spec)


def random_batch(
    batch: int, length: int, vocab: int, generator: torch.Generator, low: int = 0
) -> Batch:
    """A full (batch, length) batch of random token ids in [low, vocab), each sequence scoring
    two random single-token candidates at its last position: the shape benchmarks and memory
    tests need without a tokenizer or data."""
    ids = torch.randint(low, vocab, (batch, length), generator=generator)
    spec = ScoreSpec(
        positions=torch.arange(batch) * length + length - 1,
        position_index=torch.arange(batch).repeat_interleave(2),
        tokens=torch.randint(low, vocab, (2 * batch,), generator=generator),
        candidate_index=torch.arange(2 * batch),
        labels=torch.randint(0, 2, (batch,), generator=generator),
        num_candidates=2,
    )
    return Batch(ids, torch.ones_like(ids), spec)
