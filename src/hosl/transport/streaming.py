"""A request as a stream of frames: one head, then one frame per hidden-state tensor.

The head is the request itself with its hidden states left out (batch mask, position ids, score
recipe, step id and scalars), plus the number of parts that follow. Then the parts, in wire order:
the clean activations first (`clean` / `hidden`), then the perturbed ones h⁺₁, h⁻₁, h⁺₂, ... Sent
this way, the client can put each perturbed activation on the wire as soon as its forward pass
ends, and the server can evaluate it while the next one is still being computed or in flight:
`LazyParts` hands the party each tensor when it first asks for it, receiving it only then. The
server party's code is the same as in-process; only its list of activations is lazy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, overload

import torch
from torch import Tensor

from hosl.transport.codec import CodecError, Limits, decode, encode
from hosl.transport.messages import (
    EvalRequest,
    FoStepRequest,
    HoslStepRequest,
    ZoStepRequest,
    hidden_wire_dtype,
    message_from_parts,
    to_bytes,
)

EAGER_FIELDS = ("clean", "hidden")  # one tensor each, sent right after the head
LAZY_FIELD = "perturbed"  # 2Q tensors, sent (and consumed) one by one
REQUESTS: dict[str, type] = {
    cls.__name__: cls for cls in (HoslStepRequest, FoStepRequest, ZoStepRequest, EvalRequest)
}
MAX_PARTS = 4097  # Q up to 2048: far above any sensible estimate count, far below abuse
_PARTS_KEY = "@parts"
_EMPTY = torch.empty(0)


def _eager_fields(cls: type) -> list[str]:
    names = {f.name for f in dataclasses.fields(cls)}
    return [name for name in EAGER_FIELDS if name in names]


def request_frames(req: Any, wire_dtype: torch.dtype) -> tuple[bytes, Iterator[bytes]]:
    """(head frame, part frames). Part frames are produced on demand: iterating a lazy
    `perturbed` sequence may run a client forward pass per element."""
    eager = _eager_fields(type(req))
    lazy: Sequence[Tensor] | None = getattr(req, LAZY_FIELD, None)
    placeholders: dict[str, Any] = {name: _EMPTY for name in eager}
    if lazy is not None:
        placeholders[LAZY_FIELD] = []
    count = len(eager) + (len(lazy) if lazy is not None else 0)
    head = to_bytes(dataclasses.replace(req, **placeholders), wire_dtype, {_PARTS_KEY: count})

    kind = type(req).__name__

    def parts() -> Iterator[bytes]:
        index = 0
        for name in eager:
            dtype = hidden_wire_dtype(kind, name, None, wire_dtype)
            yield part_frame(index, getattr(req, name), dtype)
            index += 1
        # By index, never bound to a name here: each activation is freed once its frame is made,
        # before the next element (a lazy sequence's next forward pass) is asked for.
        perturbed: Sequence[Tensor] = lazy if lazy is not None else ()
        for i in range(len(perturbed)):
            yield part_frame(index, perturbed[i],
                             hidden_wire_dtype(kind, LAZY_FIELD, i, wire_dtype))
            index += 1

    return head, parts()


def part_frame(index: int, tensor: Tensor, wire_dtype: torch.dtype) -> bytes:
    return encode("part", {"index": index}, {"h": tensor.detach().to(wire_dtype)})


class LazyParts(Sequence[Tensor]):
    """The perturbed activations of a streamed request, received when first asked for."""

    def __init__(self, receive: Callable[[], Tensor], count: int) -> None:
        self._receive = receive
        self._count = count
        self._got: list[Tensor] = []

    def __len__(self) -> int:
        return self._count

    @property
    def complete(self) -> bool:
        return len(self._got) == self._count

    def drain(self) -> None:
        """Receive whatever the consumer did not ask for, keeping the stream in step."""
        if self._count:
            self[self._count - 1]

    @overload
    def __getitem__(self, i: int) -> Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Tensor]: ...

    def __getitem__(self, i: int | slice) -> Tensor | Sequence[Tensor]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"part {i} of {self._count}")
        while len(self._got) <= i:
            self._got.append(self._receive())
        return self._got[i]

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(self._count):
            yield self[i]


def _check_int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise CodecError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def open_request(
    head: bytes,
    next_frame: Callable[[], bytes],
    compute_dtype: torch.dtype,
    hidden_size: int,
    limits: Limits | None = None,
    decoding: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Any, LazyParts | None]:
    """Decode a head and attach its parts: eager tensors received now, the perturbed list lazy.

    Every part must be (S, L, hidden_size), S and L from the head's attention mask. Each part is
    decoded inside `decoding()` (e.g. the receiving party's meter phase), after `next_frame`
    returned it: the work that produces a frame is not the receiver's. Returns (request, lazy
    parts or None). Raises CodecError on anything malformed.
    """
    kind, scalars, tensors = decode(head, limits)
    if kind not in REQUESTS:
        raise CodecError(f"expected a request head, got a {kind!r} frame")
    count = _check_int("part count", scalars.get(_PARTS_KEY), 0)
    if count > MAX_PARTS:
        raise CodecError(f"{count} parts exceed the limit of {MAX_PARTS}")
    req = message_from_parts(kind, scalars, tensors, compute_dtype)
    if not isinstance(req, EvalRequest):
        _check_int("step", req.step, 0)
        _check_int("micro", req.micro, 0)
        if not isinstance(req.update, bool):
            raise CodecError("update must be true or false")
    mask = req.batch.attention_mask
    if mask.dim() != 2:
        raise CodecError(f"attention mask must be (S, L), got {tuple(mask.shape)}")
    receive_part = PartReader(next_frame, compute_dtype, (*mask.shape, hidden_size), limits,
                              decoding)
    eager = _eager_fields(type(req))
    lazy_count = count - len(eager)
    has_lazy = hasattr(req, LAZY_FIELD)
    if lazy_count < 0 or (lazy_count and not has_lazy):
        raise CodecError(f"{kind} cannot have {count} parts")
    for name in eager:
        setattr(req, name, receive_part())
    lazy = LazyParts(receive_part, lazy_count) if has_lazy else None
    if lazy is not None:
        req.perturbed = lazy
    return req, lazy


class PartReader:
    """Turns part frames into checked hidden-state tensors, in order: index i, then i + 1, ..."""

    def __init__(
        self,
        next_frame: Callable[[], bytes],
        compute_dtype: torch.dtype,
        hidden_shape: tuple[int, ...],
        limits: Limits | None = None,
        decoding: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self._next_frame = next_frame
        self._dtype = compute_dtype
        self._hidden_shape = hidden_shape
        self._limits = limits
        self._decoding = decoding
        self.index = 0

    def __call__(self) -> Tensor:
        frame = self._next_frame()
        with self._decoding():
            return self._decode(frame)

    def _decode(self, frame: bytes) -> Tensor:
        kind, scalars, tensors = decode(frame, self._limits)
        if kind != "part" or scalars.get("index") != self.index or set(tensors) != {"h"}:
            raise CodecError(f"expected part {self.index}, got a {kind!r} frame")
        hidden = tensors["h"]
        expected = self._hidden_shape
        if tuple(hidden.shape) != expected or not hidden.is_floating_point():
            raise CodecError(
                f"part {self.index} has shape {tuple(hidden.shape)} and dtype {hidden.dtype}; "
                f"expected floating point {expected}"
            )
        self.index += 1
        return hidden.to(self._dtype)
