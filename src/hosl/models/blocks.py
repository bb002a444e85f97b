"""Running a slice of decoder blocks the way OPT's and GPT-2's own model classes run them."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask


def run_causal_blocks(
    config: PretrainedConfig,
    blocks: Iterable[nn.Module],
    hidden: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
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
        hidden = block(
            hidden,
            attention_mask=causal_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    return hidden  # (S, L, H)
