"""What a request must satisfy before the server applies anything: sizes and indices the model
accepts, finite activations, and a finite loss and gradient before a step is committed.

The codec only guarantees well-formed tensors. A token holder could still send NaN or 1e38
activations, position ids of 1e12, sequences longer than the model's positions, or a score
recipe whose indices point outside the batch or the vocabulary. One such step, applied, would
leave every later loss NaN (checkpoint and journal included), so each is refused with an error to
that client and nothing of the step is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor

from hosl.transport.codec import CodecError


class NotFinite(CodecError):
    """A tensor, loss or gradient that is NaN or infinite."""


@dataclass(frozen=True)
class ModelBounds:
    """What the server's model accepts. None: not known, not checked."""

    max_positions: int | None = None  # config.max_position_embeddings
    vocab_size: int | None = None


# Beyond this an activation's square overflows float32, which is what the models' norms compute
# (RMSNorm's mean of squares): such a step's loss and gradients mean nothing. Real activations,
# "massive" outliers included, stay below 1e5.
MAX_ACTIVATION = 2.0**63


def check_finite(what: str, tensor: Tensor) -> Tensor:
    """`tensor` if every entry is finite and below MAX_ACTIVATION in magnitude."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor
    if not bool(torch.isfinite(tensor).all()):
        raise NotFinite(f"{what} holds NaN or infinite values; nothing of the step was applied")
    if float(tensor.abs().max()) >= MAX_ACTIVATION:
        raise NotFinite(
            f"{what} holds values of 2^63 or more, which overflow the model's float32 norms; "
            "nothing of the step was applied"
        )
    return tensor


def _check_range(what: str, tensor: Tensor, low: int, high: int) -> None:
    """Integer entries in low..high-1 (an empty tensor passes)."""
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise CodecError(f"{what} must be an integer tensor, got {tensor.dtype}")
    if tensor.numel() and (int(tensor.min()) < low or int(tensor.max()) >= high):
        raise CodecError(
            f"{what} must lie in {low}..{high - 1}, got {int(tensor.min())}..{int(tensor.max())}"
        )


def check_batch(batch: Any, bounds: ModelBounds, max_length: int | None = None) -> None:
    """The (S, L) mask and position ids, and the score recipe, against the model's limits."""
    mask, positions = batch.attention_mask, batch.position_ids
    if mask.dim() != 2 or tuple(positions.shape) != tuple(mask.shape):
        raise CodecError(
            f"attention mask {tuple(mask.shape)} and position ids {tuple(positions.shape)} "
            "must both be (S, L)"
        )
    rows, length = mask.shape
    longest = min(x for x in (bounds.max_positions, max_length, math.inf) if x is not None)
    if length > longest:
        raise CodecError(f"sequences of {length} tokens exceed the limit of {longest}")
    _check_range("the attention mask", mask, 0, 2)
    _check_range("position ids", positions, 0, bounds.max_positions or 2**62)
    spec = batch.spec
    count = spec.num_candidates
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise CodecError(f"num_candidates must be a positive integer, got {count!r}")
    reads = spec.tokens.numel()
    examples = spec.labels.numel()
    if spec.labels.dim() != 1 or examples * count > max(reads, 1):
        raise CodecError(f"{examples} examples of {count} candidates need more than {reads} reads")
    for name in ("positions", "position_index", "tokens", "candidate_index"):
        if getattr(spec, name).dim() != 1:
            raise CodecError(f"score recipe field {name} must be one-dimensional")
    if not spec.position_index.numel() == reads == spec.candidate_index.numel():
        raise CodecError("the score recipe's reads disagree in length")
    _check_range("score positions", spec.positions, 0, rows * length)
    _check_range("score position indices", spec.position_index, 0, spec.positions.numel())
    _check_range("candidate tokens", spec.tokens, 0, bounds.vocab_size or 2**62)
    _check_range("candidate indices", spec.candidate_index, 0, examples * count)
    _check_range("labels", spec.labels, -1, count)


def check_reply(reply: Any) -> None:
    """A reply whose loss, losses or gradients are not finite must not be committed."""
    for name in ("loss", "losses", "grads"):
        value = getattr(reply, name, None)
        values = value if isinstance(value, list) else [value] if value is not None else []
        if not all(math.isfinite(v) for v in values):
            raise NotFinite(f"the step's {name} is not finite; the step was not applied")
    grad = getattr(reply, "grad", None)
    if grad is not None and not bool(torch.isfinite(grad).all()):
        raise NotFinite("the gradient for the client is not finite; the step was not applied")


def check_gradients(parameters: Iterator[Tensor]) -> None:
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        raise NotFinite("the server's gradient is not finite; the step was not applied")


class FiniteParts(Sequence[Tensor]):
    """A lazily received list of activations, each checked to be finite when it arrives."""

    def __init__(self, parts: Sequence[Tensor], what: str = "perturbed activation") -> None:
        self._parts = parts
        self._what = what

    def __len__(self) -> int:
        return len(self._parts)

    @overload
    def __getitem__(self, i: int) -> Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Tensor]: ...

    def __getitem__(self, i: int | slice) -> Tensor | Sequence[Tensor]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return check_finite(f"{self._what} {i}", self._parts[i])

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self)):
            yield self[i]
