"""Split adapter for GPT-2.

GPT-2 adds a learned position table (`wpe`) to the token embeddings (`wte`) and applies embedding
dropout before the first block; the client owns all three, so positions are added exactly once.
The blocks take the cache as their second positional argument, so they are called with keywords
only (and no cache).
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from hosl.models.blocks import run_causal_blocks


class GPT2Embedding(nn.Module):
    """Token plus learned position embeddings, then embedding dropout (a no-op in eval mode)."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Module) -> None:
        super().__init__()
        self.wte = wte
        self.wpe = wpe
        self.drop = drop

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        embeds = self.wte(input_ids)  # (S, L, H)
        return self.drop(embeds + self.wpe(position_ids).to(embeds.device))


class GPT2Blocks(nn.Module):
    """Transformer blocks [start, stop) run as `GPT2Model.forward` runs them."""

    def __init__(self, config: PretrainedConfig, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.checkpointing = False  # see `call_block`
        self.h = nn.ModuleList(blocks)

    def forward(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        return run_causal_blocks(
            self.config, self.h, hidden, attention_mask, position_ids, self.checkpointing
        )


class GPT2Final(nn.Module):
    """The final layer norm `ln_f`."""

    def __init__(self, ln_f: nn.Module) -> None:
        super().__init__()
        self.ln_f = ln_f

    def forward(self, hidden: Tensor) -> Tensor:
        return self.ln_f(hidden)


class GPT2Adapter:
    """Builds the GPT-2 stages from the model's own submodules (parameters are shared)."""

    def embedding_stage(self, model: PreTrainedModel) -> nn.Module:
        base = model.base_model
        return GPT2Embedding(base.wte, base.wpe, base.drop)

    def block_stage(
        self, model: PreTrainedModel, start: int, stop: int, *, own_helpers: bool
    ) -> nn.Module:
        # GPT-2 blocks need no parameter-free helper module, so `own_helpers` changes nothing.
        return GPT2Blocks(model.config, list(model.base_model.h[start:stop]))

    def final_stage(self, model: PreTrainedModel) -> nn.Module:
        return GPT2Final(model.base_model.ln_f)
