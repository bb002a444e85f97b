"""LoRA adapters on a split part (or the unsplit model), through Hugging Face `peft`.

`peft.inject_adapter_in_model` replaces each target linear layer of a part with a LoRA layer
(frozen `base_layer` plus trainable `lora_A` (r × in) and `lora_B` (out × r)) and freezes every
other parameter of the part, so the part's trainable parameters are its adapters alone: the ZO
target of a ZO party, the optimizer's parameters of an FO one.

Three things hosl adds to what peft does:

- names: a part's noise is keyed by the unsplit model's parameter names (`part.model_names`, see
  `hosl.models.split`). An adapter tensor is named after the layer it adapts, the way the same
  adapter on the unsplit model would be: `model.layers.5.self_attn.q_proj.lora_A.weight`. So the
  names are unique across the client and the server, and equal in split and unsplit runs.
- initialisation: peft draws A from torch's global generator. Here each A is drawn from a
  generator seeded by (run seed, its name), with peft's distribution (Kaiming-uniform, a=√5), and
  B is zero as in peft. The adapter a part starts from is then a function of the run's seed
  alone: a networked client that restarts from the pretrained weights rebuilds it exactly, and a
  split run starts from the same adapter as the unsplit one.
- dtype: adapters are kept in float32 whatever the base's dtype (as peft's own
  `autocast_adapter_dtype` does): they are small, an FO optimizer then needs no master copy, and
  a ZO update needs no stochastic rounding. A ZO party over a bf16 base still computes in float32:
  `hosl.zo.engine` casts the frozen base on use, one module at a time.

Dropout is never used: every part runs in eval mode (a ZO difference must see one function).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hosl.errors import ConfigError, HoslError
from hosl.zo.seeds import tensor_seed

# model_type -> the modules LoRA adapts by default: the attention's query and value projections,
# as in the LoRA paper. GPT-2 computes q, k and v in one fused Conv1D (`c_attn`).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
}
# GPT-2's Conv1D stores its weight as (in, out): peft must be told, or it warns and transposes.
_FAN_IN_FAN_OUT = {"gpt2"}


def target_modules(model_type: str, targets: str | None) -> list[str]:
    """The module names to adapt: `targets` (comma-separated) or the family's default."""
    if targets:
        return [t.strip() for t in targets.split(",") if t.strip()]
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"no default LoRA target modules for model type {model_type!r}; name them with "
            "client.lora_targets / server.lora_targets (e.g. q_proj,v_proj)"
        )
    return list(DEFAULT_TARGETS[model_type])


def attach_lora(
    part: nn.Module, *, rank: int, alpha: float, targets: str | None, seed: int, who: str
) -> None:
    """Put LoRA adapters on `part` in place; afterwards only they are trainable.

    `who` names the party in errors (`client`, `server`). A part with `model_names` (every split
    or unsplit part) gets the adapters' model names added (see the module docstring).
    """
    from peft import LoraConfig, inject_adapter_in_model  # heavy import: only when used

    config = part.config
    modules = target_modules(config.model_type, targets)
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=modules,
        fan_in_fan_out=config.model_type in _FAN_IN_FAN_OUT,
        bias="none",
    )
    before = dict(getattr(part, "model_names", {}))
    try:
        inject_adapter_in_model(lora, part)
    except ValueError:  # peft's NoMatchingPeftModuleError is a ValueError
        raise ConfigError(
            f"{who}.adapter lora: no module of the {who}'s part is named {', '.join(modules)} "
            f"(split layer {getattr(part, 'split_layer', '-')}: a part without decoder blocks has "
            f"nothing to adapt); choose another split layer, {who}.lora_targets, or "
            f"{who}.adapter none"
        ) from None
    names = {local: _model_name(local, before) for local, _ in part.named_parameters()}
    part.model_names = names
    _init_adapters(part, names, seed)
    part.adapter = "lora"


def _model_name(local: str, before: dict[str, str]) -> str:
    """The whole model's name of a part's parameter after injection.

    `X.base_layer.weight` is the old `X.weight`; `X.lora_A.default.weight` becomes the model's name
    of `X` followed by `.lora_A.weight` (peft's adapter name `default` dropped: one adapter).
    """
    if ".base_layer." in local:
        old = local.replace(".base_layer.", ".", 1)
        return before.get(old, old)
    if ".lora_" in local:
        layer, rest = local.split(".lora_", 1)
        kind, _adapter, *tail = rest.split(".")
        base = before.get(f"{layer}.weight", f"{layer}.weight").removesuffix(".weight")
        return ".".join([base, f"lora_{kind}", *tail])
    return before.get(local, local)


@torch.no_grad()
def _init_adapters(part: nn.Module, names: dict[str, str], seed: int) -> None:
    """A from a generator of (seed, name), B zero; float32 (see the module docstring)."""
    for local, param in part.named_parameters():
        if not param.requires_grad:
            continue
        param.data = param.data.float()
        name = names[local]
        if ".lora_B" in name:
            param.zero_()
            continue
        generator = torch.Generator(device=param.device)
        generator.manual_seed(tensor_seed(seed, "lora init " + name) & ((1 << 63) - 1))
        nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)


def has_adapter(part: nn.Module) -> bool:
    return getattr(part, "adapter", None) is not None


def trainable_count(part: nn.Module) -> int:
    return sum(p.numel() for p in part.parameters() if p.requires_grad)


def trainable_bytes(part: nn.Module) -> int:
    """Bytes of what `part` trains (its adapters alone when it has some): what FedAvg moves."""
    return sum(p.numel() * p.element_size() for p in part.parameters() if p.requires_grad)


def trained_state(part: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a part: the tensors it trains. When every parameter trains, that
    is the part's whole state; otherwise its trainable parameters alone (a part with adapters: the
    adapters; a part that trains nothing, a frozen client: nothing). The rest is the pretrained
    model's, rebuilt from it at resume, eval and export."""
    named = dict(part.named_parameters())
    if all(p.requires_grad for p in named.values()):
        return part.state_dict()  # tied names and persistent buffers included, as before
    return {name: p.detach() for name, p in named.items() if p.requires_grad}


def load_trained_state(part: nn.Module, state: dict[str, Any], who: str) -> None:
    """Load what `trained_state` wrote; a checkpoint of other trained tensors is refused.

    A part without adapters that trains nothing (a frozen client) also takes its whole state:
    checkpoints written before such a part stored nothing hold it (its pretrained values)."""
    named = dict(part.named_parameters())
    expected = {name for name, p in named.items() if p.requires_grad}
    if len(expected) == len(named):  # everything trains: the whole state, strictly
        part.load_state_dict(state)
    elif set(state) == expected:  # the rest stays as the pretrained model has it
        part.load_state_dict(state, strict=False)
    elif not has_adapter(part) and set(state) == set(part.state_dict()):
        part.load_state_dict(state)
    else:
        what, settings = (("this run's adapters", "adapter settings") if has_adapter(part)
                          else ("the tensors this run trains", "settings (mode, adapters)"))
        raise HoslError(f"the {who}'s checkpoint does not hold {what} ({len(state)} tensors "
                        f"saved, {len(expected)} expected): it was written with other {settings}")


def merge_adapters(root: nn.Module) -> int:
    """Fold every LoRA layer under `root` into its base layer (W += s·B·A) and put the base layer
    back in its place; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(root.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge(safe_merge=True)
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, module.get_base_layer())
        merged += 1
    return merged
