"""What the client and the server say to each other: one small dataclass per message.

The parties speak these types and know nothing of bytes; `hosl.transport.messages` turns them
into bytes and back, so neither side of that boundary imports the other.

Perturbed activations travel as differences, never as themselves (see `HoslStepRequest`): the
ε-sized signal a ZO estimate reads lives in h⁺ − h⁻, and a low-precision wire (bf16 rounds h by
about 0.4%) would drown it if it rounded h⁺ and h⁻ separately. Rounding a difference keeps the
signal; the rounding of the base they are added back to is common to both losses of a pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from hosl.batching import ScoreSpec


@dataclass
class CutBatch:
    """Everything the server needs about a batch except the hidden states: no raw text."""

    attention_mask: Tensor  # (S, L) long
    position_ids: Tensor  # (S, L) long
    spec: ScoreSpec


@dataclass
class HoslStepRequest:
    """One HOSL step's traffic: 2Q perturbed activations and the clean one, sent together."""

    step: int
    micro: int
    update: bool  # the last micro-batch of the step: the server steps its optimizer
    batch: CutBatch
    # 2Q × (S, L, H) differences from `clean`: h⁺₁ − h, h⁻₁ − h, h⁺₂ − h, ...
    perturbed: list[Tensor]
    clean: Tensor  # (S, L, H) h at the unperturbed client parameters; sent first


@dataclass
class HoslStepReply:
    losses: list[float]  # 2Q losses at the server's parameters before its update
    loss: float  # the clean loss the server trained on


@dataclass
class FoStepRequest:
    step: int
    micro: int
    update: bool
    batch: CutBatch
    hidden: Tensor  # (S, L, H)


@dataclass
class FoStepReply:
    loss: float
    grad: Tensor  # (S, L, H): ∂L/∂h for the client's backward


@dataclass
class ZoStepRequest:
    """ZO-ZO: the server perturbs its own parameters with the same seeds as the client."""

    step: int
    micro: int
    update: bool
    lr: float
    weight_decay: float
    eps: float
    seeds: list[int]  # Q seeds
    batch: CutBatch
    # 2Q × (S, L, H), each pair as its first member and the difference: h⁺₁, h⁻₁ − h⁺₁, h⁺₂, ...
    perturbed: list[Tensor]


@dataclass
class ZoStepReply:
    losses: list[float]  # 2Q
    grads: list[float]  # Q projected gradients, each averaged by the server the same way


@dataclass
class EvalRequest:
    batch: CutBatch
    hidden: Tensor  # (S, L, H)


@dataclass
class EvalReply:
    scores: Tensor  # (B, C) per-candidate mean log-probabilities
