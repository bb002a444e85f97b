"""Split adapter for OPT.

OPT adds a learned position table (offset by 2) to the token embeddings, and when
`word_embed_proj_dim != hidden_size` it projects the embeddings in (`project_in`) before the first
layer and the final hidden states back out (`project_out`) before the head. Both projections and
the position table must stay on the side that owns them: position embeddings are added once, by
the client, and the head sees `word_embed_proj_dim`-wide states.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from hosl.models.blocks import run_causal_blocks


def _decoder(model: PreTrainedModel) -> nn.Module:
    return model.base_model.decoder


class OPTEmbedding(nn.Module):
    """Token embeddings (+ `project_in`) plus learned position embeddings."""

    def __init__(
        self, embed_tokens: nn.Embedding, embed_positions: nn.Module, project_in: nn.Module | None
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_positions = embed_positions
        self.project_in = project_in

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        embeds = self.embed_tokens(input_ids)  # (S, L, word_embed_proj_dim)
        # Explicit position ids: the table's own offset of 2 is applied inside, as in OPTDecoder.
        positions = self.embed_positions(attention_mask, 0, position_ids=position_ids)  # (S, L, H)
        if self.project_in is not None:
            embeds = self.project_in(embeds)  # (S, L, H)
        return embeds + positions.to(embeds.device)


class OPTBlocks(nn.Module):
    """Decoder layers [start, stop) run as `OPTDecoder.forward` runs them.

    LayerDrop is not applied: every forward pass runs every layer, which the zeroth-order
    estimate needs (all perturbed passes must evaluate the same function).
    """

    def __init__(self, config: PretrainedConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.checkpointing = False  # see `call_block`
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        return run_causal_blocks(
            self.config, self.layers, hidden, attention_mask, position_ids, self.checkpointing
        )


class OPTFinal(nn.Module):
    """Final layer norm (absent in post-norm OPT variants) and `project_out` (when present)."""

    def __init__(self, final_layer_norm: nn.Module | None, project_out: nn.Module | None) -> None:
        super().__init__()
        self.final_layer_norm = final_layer_norm
        self.project_out = project_out

    def forward(self, hidden: Tensor) -> Tensor:
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)  # (S, L, word_embed_proj_dim)
        return hidden


class OPTAdapter:
    """Builds the OPT stages from the model's own submodules (parameters are shared)."""

    def embedding_stage(self, model: PreTrainedModel) -> nn.Module:
        decoder = _decoder(model)
        return OPTEmbedding(decoder.embed_tokens, decoder.embed_positions, decoder.project_in)

    def block_stage(
        self, model: PreTrainedModel, start: int, stop: int, *, own_helpers: bool
    ) -> nn.Module:
        # OPT layers need no parameter-free helper module, so `own_helpers` changes nothing.
        return OPTBlocks(model.config, list(_decoder(model).layers[start:stop]))

    def final_stage(self, model: PreTrainedModel) -> nn.Module:
        decoder = _decoder(model)
        return OPTFinal(decoder.final_layer_norm, decoder.project_out)
