"""Cut a causal LM at layer k into a client part and a server part.

The client runs the embeddings and blocks 0..k-1; the server runs blocks k..N-1, the final norm
(and OPT's `project_out`) and owns the output head. Both parts are built from the model's own
submodules, so they share parameters with it: nothing is re-implemented and position embeddings
are added exactly once. Per-architecture knowledge lives in one small adapter per family
(`opt.py`, `llama.py`, `gpt2.py`), chosen by `config.model_type`; this module holds what every
family shares.

Every stage takes the 2-D padding mask and builds its own 4-D mask with the model's attention
implementation, so only `Activations` (hidden states, padding mask, position ids) cross the cut.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from hosl.config import check_split_layer
from hosl.errors import ConfigError, ModelLoadError
from hosl.models.gpt2 import GPT2Adapter
from hosl.models.llama import LlamaAdapter
from hosl.models.opt import OPTAdapter


class SplitAdapter(Protocol):
    """What one architecture family provides. Every stage reuses the model's modules.

    - embedding stage: `forward(input_ids, attention_mask, position_ids) -> (S, L, H)`
    - block stage (layers [start, stop)): `forward(hidden, attention_mask, position_ids) -> hidden`;
      `own_helpers=True` gives it private copies of parameter-free helpers (rotary tables) that
      the other side also uses, so the two sides can live on different devices.
    - final stage: `forward(hidden) -> (S, L, H_out)` (final norm, OPT's project_out)
    """

    def embedding_stage(self, model: PreTrainedModel) -> nn.Module: ...

    def block_stage(
        self, model: PreTrainedModel, start: int, stop: int, *, own_helpers: bool
    ) -> nn.Module: ...

    def final_stage(self, model: PreTrainedModel) -> nn.Module: ...


_LLAMA = LlamaAdapter()

# model_type -> adapter. Read-only: adding a family means adding an adapter file and a line here.
_ADAPTERS: Mapping[str, SplitAdapter] = MappingProxyType(
    {
        "gpt2": GPT2Adapter(),
        "llama": _LLAMA,
        "mistral": _LLAMA,
        "opt": OPTAdapter(),
        "qwen2": _LLAMA,
        "qwen3": _LLAMA,
    }
)


def supported_model_types() -> list[str]:
    """The `config.model_type` values that `split_model` can cut, sorted."""
    return sorted(_ADAPTERS)


def _config_of(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    return getattr(model_or_config, "config", model_or_config)


def _adapter_for(config: PretrainedConfig) -> SplitAdapter:
    model_type = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        raise ModelLoadError(
            f"cannot split model type '{model_type}': hosl supports "
            f"{', '.join(supported_model_types())}; choose a model of one of these architectures"
        )
    return adapter


def num_layers(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    """N, the number of decoder blocks; valid split layers are 0..N."""
    config = _config_of(model_or_config)
    _adapter_for(config)
    return int(config.num_hidden_layers)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(S, L) padding mask -> (S, L) long position ids: cumsum(mask) - 1, clamped at 0.

    Real tokens get 0, 1, 2, ... whether the batch is left- or right-padded.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Activations:
    """What crosses the cut, client -> server."""

    hidden: Tensor  # (S, L, H) after block k-1 (after the embeddings when k == 0)
    attention_mask: Tensor  # (S, L) long, 1 = real token, 0 = padding
    position_ids: Tensor  # (S, L) long


def _padding_mask(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (S, L); got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    return attention_mask.long()


def _output_head(model: PreTrainedModel) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ModelLoadError(
            f"the {type(model).__name__} model has no output head; load it as a causal LM "
            "(AutoModelForCausalLM) to split it"
        )
    if getattr(head, "bias", None) is not None:
        raise ModelLoadError(
            f"the {type(model).__name__} output head has a bias, which hosl's head does not "
            "support; use a model whose head is a plain weight matrix"
        )
    return head


def _is_tied(model: PreTrainedModel, head: nn.Module) -> bool:
    embedding = model.get_input_embeddings().weight
    if head.weight is embedding:
        return True
    both_real = not (head.weight.is_meta or embedding.is_meta)
    return both_real and head.weight.data_ptr() == embedding.data_ptr()


def _own_head_copy(head: nn.Module) -> nn.Linear:
    """A head with its own weight tensor, equal in value to `head.weight` (V, H_out)."""
    weight = head.weight
    vocab, width = weight.shape
    copy = nn.Linear(width, vocab, bias=False, device="meta")
    copy.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return copy


def _normal_tensor(t: Tensor) -> Tensor:
    # A client running under torch.inference_mode() sends inference tensors; autograd refuses to
    # save those for backward, so a server that trains copies them into normal tensors.
    return t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t


class ClientPart(nn.Module):
    """Embeddings and blocks 0..k-1 (plus OPT's project_in and learned positions)."""

    def __init__(
        self, config: PretrainedConfig, split_layer: int, embedding: nn.Module, blocks: nn.Module
    ) -> None:
        super().__init__()
        self.config = config
        self.split_layer = split_layer
        self.embedding = embedding
        self.blocks = blocks

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Activations:
        attention_mask = _padding_mask(input_ids, attention_mask)  # (S, L)
        position_ids = position_ids_from_mask(attention_mask)  # (S, L)
        hidden = self.embedding(input_ids, attention_mask, position_ids)  # (S, L, H)
        hidden = self.blocks(hidden, attention_mask, position_ids)  # (S, L, H)
        return Activations(hidden, attention_mask, position_ids)


class ServerPart(nn.Module):
    """Blocks k..N-1, the final norm (and OPT's project_out), and the output head.

    `forward` stops before the head: the caller applies `head` only where it needs logits.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        split_layer: int,
        blocks: nn.Module,
        final: nn.Module,
        head: nn.Module,
    ) -> None:
        super().__init__()
        self.config = config
        self.split_layer = split_layer
        self.blocks = blocks
        self.final = final
        self.head = head

    def forward(self, acts: Activations) -> Tensor:
        hidden = _normal_tensor(acts.hidden)  # (S, L, H)
        attention_mask = _normal_tensor(acts.attention_mask)  # (S, L)
        position_ids = _normal_tensor(acts.position_ids)  # (S, L)
        hidden = self.blocks(hidden, attention_mask, position_ids)
        return self.final(hidden)  # (S, L, H_out)


class UnsplitPart(nn.Module):
    """The whole model in one piece, for the unsplit reference modes. Head not applied."""

    def __init__(
        self,
        config: PretrainedConfig,
        embedding: nn.Module,
        blocks: nn.Module,
        final: nn.Module,
        head: nn.Module,
    ) -> None:
        super().__init__()
        self.config = config
        self.embedding = embedding
        self.blocks = blocks
        self.final = final
        self.head = head  # the model's own head: a tied weight stays the embedding's tensor

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        attention_mask = _padding_mask(input_ids, attention_mask)  # (S, L)
        position_ids = position_ids_from_mask(attention_mask)  # (S, L)
        hidden = self.embedding(input_ids, attention_mask, position_ids)  # (S, L, H)
        hidden = self.blocks(hidden, attention_mask, position_ids)  # (S, L, H)
        return self.final(hidden)  # (S, L, H_out)


def _check_split_layer(config: PretrainedConfig, k: object) -> int:
    """k as an int, range-checked by the one check hosl has (`hosl.config.check_split_layer`)."""
    try:
        if isinstance(k, bool):
            raise TypeError
        layer = operator.index(k)
    except TypeError:
        n = int(config.num_hidden_layers)
        raise ConfigError(f"split layer {k!r} is not an integer from 0 to {n}") from None
    return check_split_layer(layer, int(config.num_hidden_layers), config.model_type)


def split_model(model: PreTrainedModel, k: int) -> tuple[ClientPart, ServerPart]:
    """Cut `model` after block k-1: the client gets blocks 0..k-1, the server k..N-1.

    Both parts share parameters with `model`, except that a head tied to the input embedding is
    copied so the server owns its own (the client keeps the embedding).
    """
    config = model.config
    adapter = _adapter_for(config)
    k = _check_split_layer(config, k)
    n = int(config.num_hidden_layers)
    head = _output_head(model)
    tied = _is_tied(model, head)
    own_head = _own_head_copy(head) if tied else head
    client = ClientPart(
        config,
        k,
        adapter.embedding_stage(model),
        adapter.block_stage(model, 0, k, own_helpers=False),
    )
    server = ServerPart(
        config,
        k,
        adapter.block_stage(model, k, n, own_helpers=True),
        adapter.final_stage(model),
        own_head,
    )
    # The server's copy of a tied head is, in the unsplit model, the client's embedding: it keeps
    # that tensor's name, so both copies see the same noise and take the same ZO update.
    aliases = {id(own_head.weight): _model_names(model)[id(head.weight)]} if tied else {}
    _name_parameters(client, model, aliases)
    _name_parameters(server, model, aliases)
    return client, server


def unsplit_model(model: PreTrainedModel) -> UnsplitPart:
    """The whole model as one part sharing every parameter (tied weights stay tied)."""
    config = model.config
    adapter = _adapter_for(config)
    n = int(config.num_hidden_layers)
    part = UnsplitPart(
        config,
        adapter.embedding_stage(model),
        adapter.block_stage(model, 0, n, own_helpers=False),
        adapter.final_stage(model),
        _output_head(model),
    )
    _name_parameters(part, model)
    return part


def _model_names(model: PreTrainedModel) -> dict[int, str]:
    """id(parameter) -> its name in the whole model (a tied head: the embedding's name)."""
    return {id(p): name for name, p in model.named_parameters()}


def _name_parameters(
    part: nn.Module, model: PreTrainedModel, aliases: dict[int, str] | None = None
) -> None:
    """Record on `part` the whole model's name of each of its parameters (`part.model_names`).

    A part re-indexes its blocks from 0 (`blocks.layers.0` is block k on the server), so its own
    names are not unique across the split. The ZO noise of a tensor is keyed by its name: keyed by
    the model's names, no two tensors on either side ever share noise, and a tensor sees the same
    z whether it sits in the client, the server or the unsplit model.
    """
    names = {**_model_names(model), **(aliases or {})}
    part.model_names = {local: names[id(p)] for local, p in part.named_parameters()}
