"""Candidate scores and the classification loss, without the full-vocabulary logits tensor.

A server that computes `lm_head(hidden)` on every position materialises (S × L × V) logits: for
OPT-1.3B on BoolQ-length inputs that tensor alone is tens of GB. Here the head is applied only at
the P positions the `ScoreSpec` names, giving a (P × V) tensor, with P = S for single-token answers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hosl.batching import ScoreSpec
from hosl.dtypes import compute_dtype


def candidate_scores(hidden: Tensor, head: nn.Module, spec: ScoreSpec) -> Tensor:
    """Mean log-probability of each candidate's tokens: (S, L, H) final hidden -> (B, C) scores."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # (S*L, H)
    picked = flat.index_select(0, spec.positions)  # (P, H)
    logits = head(picked)  # (P, V): the only head output made
    logits = logits.to(compute_dtype(logits.dtype))
    log_probs = logits.log_softmax(dim=-1)  # (P, V)
    reads = log_probs[spec.position_index, spec.tokens]  # (T,)
    num_flat = spec.num_examples * spec.num_candidates
    totals = torch.zeros(num_flat, dtype=reads.dtype, device=reads.device)
    totals = totals.index_add(0, spec.candidate_index, reads)
    counts = torch.zeros(num_flat, dtype=reads.dtype, device=reads.device)
    counts = counts.index_add(0, spec.candidate_index, torch.ones_like(reads))
    return (totals / counts).view(spec.num_examples, spec.num_candidates)  # (B, C)


def classification_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy across candidates: (B, C) scores, (B,) labels -> scalar."""
    return F.cross_entropy(scores, labels)
