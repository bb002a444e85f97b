"""Messages as bytes: a JSON header plus raw tensor bytes. No pickle, ever.

Layout: b"HOSL" | u32 header length | JSON header | payload. The header names the message kind,
its scalars, and for each tensor its dtype, shape, offset and byte count. Every size is checked
against the buffer and the limits before anything is allocated, so a malformed or hostile message
fails with `CodecError` instead of allocating gigabytes or reading out of bounds.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hosl.dtypes import DTYPES as FLOAT_DTYPES

MAGIC = b"HOSL"
_PREFIX = struct.Struct("<4sI")

# The floating dtypes of models and the wire, plus the integer and bool dtypes of masks and ids.
DTYPES: dict[str, torch.dtype] = {
    **FLOAT_DTYPES,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CodecError(ValueError):
    """A message that is malformed or exceeds the limits."""


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 1 << 31  # 2 GiB
    max_header_bytes: int = 1 << 20  # 1 MiB of JSON
    max_tensors: int = 4096
    max_dims: int = 8


def _tensor_bytes(t: Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)  # handles 0-d and non-contiguous tensors
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).cpu().numpy().tobytes()


def encode(kind: str, scalars: dict[str, Any], tensors: dict[str, Tensor]) -> bytes:
    """Serialise one message. Scalars must be JSON values (numbers, strings, lists, dicts)."""
    metas, blobs, offset = [], [], 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise CodecError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        blob = _tensor_bytes(t)
        metas.append(
            {
                "name": name,
                "dtype": _NAMES[t.dtype],
                "shape": list(t.shape),
                "offset": offset,
                "nbytes": len(blob),
            }
        )
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps(
        {"kind": kind, "scalars": scalars, "tensors": metas}, separators=(",", ":")
    ).encode()
    return b"".join([_PREFIX.pack(MAGIC, len(header)), header, *blobs])


def _is_size(value: Any, most: int) -> bool:
    """A non-negative int (not a bool) no larger than `most`."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


def _check_meta(meta: Any, payload_len: int, limits: Limits) -> tuple[str, torch.dtype, list[int]]:
    if not isinstance(meta, dict):
        raise CodecError("tensor entry is not an object")
    name, dtype_name, shape = meta.get("name"), meta.get("dtype"), meta.get("shape")
    offset, nbytes = meta.get("offset"), meta.get("nbytes")
    # Types first: a list where a string belongs is unhashable, a bool passes for an int.
    if not isinstance(name, str) or not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CodecError(f"bad tensor name or dtype: {name!r:.80} {dtype_name!r:.80}")
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_dims
        or not all(_is_size(d, limits.max_message_bytes) for d in shape)
    ):
        raise CodecError(f"tensor {name!r:.80} has a bad shape {shape!r:.80}")
    # zero-size tensors too: torch computes strides over every dimension, which overflow
    if math.prod(max(d, 1) for d in shape) > limits.max_message_bytes:
        raise CodecError(
            f"tensor {name!r:.80}: the elements of shape {shape} do not fit the limit of "
            f"{limits.max_message_bytes} bytes"
        )
    if not _is_size(offset, limits.max_message_bytes) or not _is_size(
        nbytes, limits.max_message_bytes
    ):
        raise CodecError(f"tensor {name!r:.80} has a bad offset or size")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if expected != nbytes or offset + nbytes > payload_len:
        raise CodecError(f"tensor {name!r}: {nbytes} bytes at {offset} do not fit shape {shape}")
    return name, dtype, shape


def decode(
    buf: bytes, limits: Limits | None = None
) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """Parse one message; raises CodecError on anything malformed or over the limits."""
    limits = limits or Limits()
    if len(buf) > limits.max_message_bytes:
        raise CodecError(f"message of {len(buf)} bytes exceeds {limits.max_message_bytes}")
    if len(buf) < _PREFIX.size:
        raise CodecError("message shorter than its prefix")
    magic, header_len = _PREFIX.unpack_from(buf)
    if (
        magic != MAGIC
        or header_len > limits.max_header_bytes
        or _PREFIX.size + header_len > len(buf)
    ):
        raise CodecError("bad magic or header length")
    try:
        header = json.loads(buf[_PREFIX.size : _PREFIX.size + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CodecError(f"header is not valid JSON: {err}") from None
    except RecursionError:
        raise CodecError("header JSON is nested too deeply") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise CodecError("header has no message kind")
    metas = header.get("tensors", [])
    if not isinstance(metas, list) or len(metas) > limits.max_tensors:
        raise CodecError("bad tensor list")
    payload = memoryview(buf)[_PREFIX.size + header_len :]
    tensors: dict[str, Tensor] = {}
    for meta in metas:
        name, dtype, shape = _check_meta(meta, len(payload), limits)
        start, nbytes = meta["offset"], meta["nbytes"]
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        # Allocate through torch (so memory meters see the tensor) and copy the bytes in once.
        out = torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only source, only read from
            src = torch.frombuffer(payload[start : start + nbytes], dtype=torch.uint8)
        out.reshape(-1).view(torch.uint8).copy_(src)
        tensors[name] = out
    scalars = header.get("scalars", {})
    if not isinstance(scalars, dict):
        raise CodecError("scalars must be an object")
    return header["kind"], scalars, tensors
