"""LoRA adapters in the analytic memory model: which tensors they add and what they store.

A LoRA adapter on a linear layer W (in -> out) adds A (r x in) and B (out x r); the layer
computes W x + s · B (A x). With adapters, a party trains only A and B: the base stays frozen,
so it holds no gradients and no optimizer state for it (a ZO party perturbs only A and B). What
the adapters store for the backward is A x, (tokens, r) per adapted layer: x itself is already
stored by the block (the norm output its projections read). Adapters are float32 whatever the
base's dtype (peft's default, `autocast_adapter_dtype`).

The stored activations of the frozen base are counted as in full fine-tuning: a frozen linear
layer need not keep its input, but most of those inputs are kept anyway by the kernels around
them (attention keeps q, k, v and its output; the MLP's nonlinearity keeps its output), so this
over-counts by at most one (B, L, H) tensor per block.
"""

from __future__ import annotations

from dataclasses import dataclass

from hosl.errors import ConfigError
from hosl.memory.families import ModelShapes

ADAPTER_BYTES = 4  # float32 adapters


@dataclass(frozen=True)
class LoraSpec:
    """LoRA on `targets` (module names within a block, as peft's `target_modules`), rank r."""

    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.rank}")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module")


def block_linears(shapes: ModelShapes) -> dict[str, list[tuple[int, int]]]:
    """(in, out) features of each linear layer of one block, by module name."""
    h, i = shapes.hidden, shapes.intermediate
    q, kv = shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
    if shapes.family == "llama":
        return {"q_proj": [(h, q)], "k_proj": [(h, kv)], "v_proj": [(h, kv)],
                "o_proj": [(q, h)], "gate_proj": [(h, i)], "up_proj": [(h, i)],
                "down_proj": [(i, h)]}
    if shapes.family == "opt":
        return {"q_proj": [(h, h)], "k_proj": [(h, h)], "v_proj": [(h, h)],
                "out_proj": [(h, h)], "fc1": [(h, i)], "fc2": [(i, h)]}
    # GPT-2: "c_proj" names both the attention's and the MLP's output projection.
    return {"c_attn": [(h, 3 * h)], "c_proj": [(h, h), (i, h)], "c_fc": [(h, i)]}


def adapted_linears(shapes: ModelShapes, spec: LoraSpec) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one block that `spec` adapts."""
    linears = block_linears(shapes)
    unknown = [t for t in spec.targets if t not in linears]
    if unknown:
        raise ConfigError(
            f"no LoRA target {unknown[0]!r} in a {shapes.family} block; choose from: "
            + ", ".join(linears)
        )
    return [shape for target in dict.fromkeys(spec.targets) for shape in linears[target]]


def adapter_tensor_bytes(shapes: ModelShapes, spec: LoraSpec) -> list[int]:
    """Bytes of each adapter tensor (A, then B, per adapted layer) of one block."""
    out: list[int] = []
    for fan_in, fan_out in adapted_linears(shapes, spec):
        out += [spec.rank * fan_in * ADAPTER_BYTES, fan_out * spec.rank * ADAPTER_BYTES]
    return out


def adapter_stored_per_token(shapes: ModelShapes, spec: LoraSpec) -> int:
    """Elements per token one block's adapters store for the backward: A x per adapted layer."""
    return spec.rank * len(adapted_linears(shapes, spec))
