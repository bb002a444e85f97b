"""Running a slice of decoder blocks the way OPT's and GPT-2's own model classes run them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask


def call_block(block: nn.Module, checkpointing: bool, hidden: Tensor, **kwargs: Any) -> Tensor:
    """One decoder block on (S, L, H). With `checkpointing` and a graph being recorded, the block
    keeps only its input and recomputes its activations in the backward (non-reentrant
    `torch.utils.checkpoint`): memory for one block's activations instead of every block's."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, hidden, use_reentrant=False, **kwargs)
    return block(hidden, **kwargs)


def run_causal_blocks(
    config: PretrainedConfig,
    blocks: Iterable[nn.Module],
    hidden: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    checkpointing: bool = False,
) -> Tensor:
    """(S, L, H) through `blocks` with the causal + padding mask built from the 2-D mask.

    Each side of the split builds its own 4-D mask, so only the (S, L) mask travels.
    """
    blocks = list(blocks)
    if not blocks:
        return hidden
    # The (absent) cache goes in by position: transformers renamed that argument from
    # `past_key_values` to `cache` within the supported range, and both keep it fourth. The blocks
    # themselves default to no cache, so they are not given one.
    causal_mask = create_causal_mask(
        config, hidden, attention_mask, None, position_ids=position_ids
    )
    for block in blocks:
        hidden = call_block(
            block,
            checkpointing,
            hidden,
            attention_mask=causal_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    return hidden  # (S, L, H)


def use_checkpointing(part: nn.Module, on: bool = True) -> int:
    """Turn activation checkpointing on (or off) for every block list in `part`; returns how many
    block lists it found (each family's `*Blocks` module reads its `checkpointing` flag)."""
    found = 0
    for module in part.modules():
        if hasattr(module, "checkpointing"):
            module.checkpointing = on
            found += 1
    return found
