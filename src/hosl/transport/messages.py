"""How each message of `hosl.protocol` becomes bytes, and back.

`to_bytes`/`from_bytes` walk a message's fields generically: tensors travel as raw frames, lists
of tensors as numbered frames, nested dataclasses with a dotted prefix, everything else as JSON
scalars. Hidden states are cast to the wire dtype on the way out, except the base that a ZO
request's differences are taken around (see `hidden_wire_dtype`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hosl.batching import ScoreSpec
from hosl.protocol import (
    CutBatch,
    EvalReply,
    EvalRequest,
    FoStepReply,
    FoStepRequest,
    HoslStepReply,
    HoslStepRequest,
    ZoStepReply,
    ZoStepRequest,
)
from hosl.transport.codec import CodecError, Limits, decode, encode

MESSAGES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        HoslStepRequest,
        HoslStepReply,
        FoStepRequest,
        FoStepReply,
        ZoStepRequest,
        ZoStepReply,
        EvalRequest,
        EvalReply,
    )
}
# Transport extras (see to_bytes): the server's measured memory, sent with evaluation replies.
SERVER_MEMORY_KEY = "@server_memory"
_NESTED = (CutBatch, ScoreSpec)
_HIDDEN_FIELDS = {"perturbed", "clean", "hidden", "grad"}
# The tensors a ZO estimate's differences are added to, as (message, field) -> which items of it:
# None for a single tensor, n for every n-th item of a list from the first (ZO-ZO sends h⁺, h⁻ − h⁺
# per pair). Rounding such a base to bf16 moves the point where the server reads the directional
# derivative: on the demo model (k = 4) a bf16 clean h changed g by 2.4% (median over seeds), a
# float32 one with bf16 differences by 0.2% (benchmarks/results/zo_signal.md).
_ZO_BASES: dict[tuple[str, str], int | None] = {
    ("HoslStepRequest", "clean"): None,
    ("ZoStepRequest", "perturbed"): 2,
}


def hidden_wire_dtype(
    message: str, field: str, index: int | None, wire_dtype: torch.dtype
) -> torch.dtype:
    """The dtype `field` (item `index` of a list field) of `message` travels at: the wire dtype,
    but at least float32 for the base of a ZO estimate's differences."""
    if (message, field) not in _ZO_BASES or wire_dtype.itemsize >= 4:
        return wire_dtype
    every = _ZO_BASES[message, field]
    is_base = every is None or (index is not None and index % every == 0)
    return torch.float32 if is_base else wire_dtype


def _flatten(
    obj: Any,
    prefix: str,
    wire_dtype: torch.dtype,
    scalars: dict[str, Any],
    tensors: dict[str, Tensor],
) -> None:
    kind = type(obj).__name__
    for field in dataclasses.fields(obj):
        key, value = prefix + field.name, getattr(obj, field.name)
        cast = field.name in _HIDDEN_FIELDS
        if isinstance(value, Tensor):
            dtype = hidden_wire_dtype(kind, field.name, None, wire_dtype)
            tensors[key] = value.to(dtype) if cast else value
        elif cast and isinstance(value, Sequence) or (
            isinstance(value, list) and value and isinstance(value[0], Tensor)
        ):
            # a lazily computed sequence of activations (ClientParty.lazy_pairs) counts as a list
            scalars[key + "#"] = len(value)
            for i, t in enumerate(value):
                dtype = hidden_wire_dtype(kind, field.name, i, wire_dtype)
                tensors[f"{key}.{i}"] = t.to(dtype) if cast else t
        elif isinstance(value, _NESTED):
            _flatten(value, key + ".", wire_dtype, scalars, tensors)
        else:
            scalars[key] = value


def _build(
    cls: type,
    prefix: str,
    scalars: dict[str, Any],
    tensors: dict[str, Tensor],
    compute_dtype: torch.dtype,
) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        key, hint = prefix + field.name, hints[field.name]
        cast = field.name in _HIDDEN_FIELDS
        if hint is Tensor:
            if key not in tensors:
                raise CodecError(f"{cls.__name__} lacks tensor {key!r}")
            values[field.name] = tensors[key].to(compute_dtype) if cast else tensors[key]
        elif hint == list[Tensor]:
            count = scalars.get(key + "#", 0)
            if not isinstance(count, int) or any(f"{key}.{i}" not in tensors for i in range(count)):
                raise CodecError(f"{cls.__name__} has a broken tensor list {key!r}")
            values[field.name] = [
                tensors[f"{key}.{i}"].to(compute_dtype) if cast else tensors[f"{key}.{i}"]
                for i in range(count)
            ]
        elif hint in _NESTED:
            values[field.name] = _build(hint, key + ".", scalars, tensors, compute_dtype)
        else:
            if key not in scalars:
                raise CodecError(f"{cls.__name__} lacks field {key!r}")
            values[field.name] = scalars[key]
    return cls(**values)


def to_bytes(
    message: Any, wire_dtype: torch.dtype = torch.float32, extra: dict[str, Any] | None = None
) -> bytes:
    """Encode a message; `extra` scalars (keys starting with "@", which no field has) ride along
    for the transport's own use."""
    scalars: dict[str, Any] = dict(extra or {})
    tensors: dict[str, Tensor] = {}
    _flatten(message, "", wire_dtype, scalars, tensors)
    return encode(type(message).__name__, scalars, tensors)


def message_from_parts(
    kind: str, scalars: dict[str, Any], tensors: dict[str, Tensor], compute_dtype: torch.dtype
) -> Any:
    """Build the message named `kind` from decoded scalars and tensors (see `codec.decode`)."""
    cls = MESSAGES.get(kind)
    if cls is None:
        raise CodecError(f"unknown message kind {kind!r}")
    try:
        return _build(cls, "", scalars, tensors, compute_dtype)
    except TypeError as err:
        raise CodecError(f"{kind}: {err}") from None


def from_bytes(
    buf: bytes, compute_dtype: torch.dtype = torch.float32, limits: Limits | None = None
) -> Any:
    kind, scalars, tensors = decode(buf, limits)
    return message_from_parts(kind, scalars, tensors, compute_dtype)
