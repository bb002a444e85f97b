"""How each message of `hosl.protocol` becomes bytes, and back.

`to_bytes`/`from_bytes` walk a message's fields generically: tensors travel as raw frames, lists
of tensors as numbered frames, nested dataclasses with a dotted prefix, everything else as JSON
scalars. Hidden states are cast to the wire dtype on the way out.
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


def _flatten(
    obj: Any,
    prefix: str,
    wire_dtype: torch.dtype,
    scalars: dict[str, Any],
    tensors: dict[str, Tensor],
) -> None:
    for field in dataclasses.fields(obj):
        key, value = prefix + field.name, getattr(obj, field.name)
        cast = field.name in _HIDDEN_FIELDS
        if isinstance(value, Tensor):
            tensors[key] = value.to(wire_dtype) if cast else value
        elif cast and isinstance(value, Sequence) or (
            isinstance(value, list) and value and isinstance(value[0], Tensor)
        ):
            # a lazily computed sequence of activations (ClientParty.lazy_pairs) counts as a list
            scalars[key + "#"] = len(value)
            for i, t in enumerate(value):
                tensors[f"{key}.{i}"] = t.to(wire_dtype) if cast else t
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
