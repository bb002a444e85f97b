"""Built-in model configs by short name, with the real shapes, needing no download.

They let `hosl memory` and the analytic model size the paper's models (OPT-125M, OPT-1.3B) and
the offline demo model (SmolLM2-135M) on a machine that cannot reach the Hugging Face hub, and
let tests build a randomly initialised model with the true layout. The values are those of the
checkpoints' published config.json files; `name_or_path` holds the hub id.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import LlamaConfig, OPTConfig, PretrainedConfig

from hosl.errors import ConfigError


def _opt(hub_id: str, *, hidden: int, ffn: int, layers: int, heads: int) -> PretrainedConfig:
    config = OPTConfig(
        vocab_size=50272,
        hidden_size=hidden,
        ffn_dim=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        activation_function="relu",
        dropout=0.1,
        attention_dropout=0.0,
        enable_bias=True,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        architectures=["OPTForCausalLM"],
    )
    config.name_or_path = hub_id
    return config


def _opt_125m() -> PretrainedConfig:
    return _opt("facebook/opt-125m", hidden=768, ffn=3072, layers=12, heads=12)


def _opt_1_3b() -> PretrainedConfig:
    return _opt("facebook/opt-1.3b", hidden=2048, ffn=8192, layers=24, heads=32)


def _smollm2_135m() -> PretrainedConfig:
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        initializer_range=0.041666666666666664,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        architectures=["LlamaForCausalLM"],
    )
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M"
    return config


_BUILTIN: dict[str, Callable[[], PretrainedConfig]] = {
    "opt-125m": _opt_125m,
    "opt-1.3b": _opt_1_3b,
    "smollm2-135m": _smollm2_135m,
}


def builtin_config_names() -> list[str]:
    """Short names accepted by `builtin_config`, sorted."""
    return sorted(_BUILTIN)


def builtin_config(name: str) -> PretrainedConfig:
    """A fresh config object for a built-in model name (case-insensitive), e.g. "opt-125m".

    Raises ConfigError naming the known models when `name` is not one of them.
    """
    factory = _BUILTIN.get(name.strip().lower())
    if factory is None:
        known = ", ".join(builtin_config_names())
        raise ConfigError(f"unknown built-in model {name!r}; built-in models are: {known}")
    return factory()
