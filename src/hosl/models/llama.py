"""Split adapter for the Llama family: Llama (SmolLM2), Mistral, Qwen2, Qwen3.

These models share one layout (`model.model.{embed_tokens, layers, norm, rotary_emb}` plus
`lm_head`), rotary position embeddings computed once per forward and handed to every layer, and
no learned position table. They differ only in which layers use a sliding-window mask, which the
config states (`layer_types`, or Mistral's model-wide `sliding_window`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from hosl.errors import ModelLoadError
from hosl.models.blocks import call_block

# How each kind of layer named in `config.layer_types` builds its 4-D mask (as the HF models do).
_MASK_BUILDERS: dict[str, Callable[..., Tensor | None]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def layer_kinds(config: PretrainedConfig) -> list[str]:
    """The attention kind of every decoder layer, as the HF model picks its mask per layer."""
    n = config.num_hidden_layers
    kinds = getattr(config, "layer_types", None)
    if kinds:
        kinds = list(kinds)[:n]
    elif getattr(config, "sliding_window", None) is not None:
        # Mistral has no `layer_types`: a set `sliding_window` makes every layer slide.
        kinds = ["sliding_attention"] * n
    else:
        kinds = ["full_attention"] * n
    unknown = sorted(set(kinds) - set(_MASK_BUILDERS))
    if unknown:
        raise ModelLoadError(
            f"cannot split a {config.model_type} model with attention kinds {unknown}: "
            f"hosl supports {sorted(_MASK_BUILDERS)} layers only"
        )
    return kinds


class LlamaEmbedding(nn.Module):
    """Token embeddings only: rotary positions are applied inside each layer's attention."""

    def __init__(self, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)  # (S, L, H)


class LlamaBlocks(nn.Module):
    """Decoder layers [start, stop) run exactly as `LlamaModel.forward` runs them."""

    def __init__(
        self,
        config: PretrainedConfig,
        layers: list[nn.Module],
        kinds: list[str],
        rotary_emb: nn.Module | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(layers)
        self.kinds = kinds
        self.rotary_emb = rotary_emb
        self.checkpointing = False  # see `call_block`

    def forward(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        if len(self.layers) == 0:
            return hidden
        # Each kind of mask is built once from the 2-D padding mask, like the HF model does; the
        # config's attention implementation (eager, sdpa, ...) decides the mask's form. The
        # (absent) cache goes in by position: transformers renamed that argument from
        # `past_key_values` to `cache` within the supported range, and both keep it fourth.
        masks = {
            kind: _MASK_BUILDERS[kind](
                self.config, hidden, attention_mask, None, position_ids=position_ids
            )
            for kind in set(self.kinds)
        }
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)  # (cos, sin)
        for layer, kind in zip(self.layers, self.kinds):
            hidden = call_block(
                layer,
                self.checkpointing,
                hidden,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=False,
            )
        return hidden  # (S, L, H)


class LlamaFinal(nn.Module):
    """The final RMSNorm before the output head."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden)


class LlamaAdapter:
    """Builds the Llama-family stages from the model's own submodules (parameters are shared)."""

    def embedding_stage(self, model: PreTrainedModel) -> nn.Module:
        return LlamaEmbedding(model.base_model.embed_tokens)

    def block_stage(
        self, model: PreTrainedModel, start: int, stop: int, *, own_helpers: bool
    ) -> nn.Module:
        base = model.base_model
        rotary = None
        if stop > start:
            rotary = base.rotary_emb
            if own_helpers:
                # The rotary table has no parameters, but both sides need it; a private copy lets
                # each side move to its own device. The memo keeps the config shared.
                rotary = copy.deepcopy(rotary, memo={id(model.config): model.config})
        kinds = layer_kinds(model.config)[start:stop]
        return LlamaBlocks(model.config, list(base.layers[start:stop]), kinds, rotary)

    def final_stage(self, model: PreTrainedModel) -> nn.Module:
        return LlamaFinal(model.base_model.norm)
