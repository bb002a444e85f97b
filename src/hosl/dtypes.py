"""The one table of floating dtypes hosl accepts, by name, for models and the wire.

Every place that turns a name from a config, a flag or a wire header into a `torch.dtype` (or
back) reads it from here, so adding or refusing a dtype is one edit.
"""

from __future__ import annotations

import torch

# Canonical name -> dtype. Configs, checkpoints and wire headers always hold a canonical name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Spellings a user may type for a canonical name.
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                           "half": "float16"}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
BYTES: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for tensors stored in `dtype`: float32 for bf16 and fp16 (ZO loss
    differences are ε-sized, and log-softmax wants the range), the stored dtype from float32 up."""
    return torch.float32 if dtype.itemsize < 4 else dtype


def canonical_name(name: str) -> str | None:
    """`"bf16"`, `"torch.bfloat16"`, `"bfloat16"` -> `"bfloat16"`; None when not a known dtype."""
    name = name.removeprefix("torch.")
    name = ALIASES.get(name, name)
    return name if name in DTYPES else None


def torch_dtype(name: str) -> torch.dtype:
    """The dtype of a canonical (or aliased) name; KeyError names the accepted ones."""
    canonical = canonical_name(name)
    if canonical is None:
        raise KeyError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[canonical]
