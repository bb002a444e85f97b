"""The split parts compute exactly what the unsplit Hugging Face model computes.

Tiny random models of every supported family, padded batches (left and right), every split layer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from hosl.errors import ConfigError, ModelLoadError
from hosl.models.split import (
    Activations,
    num_layers,
    position_ids_from_mask,
    split_model,
    supported_model_types,
    unsplit_model,
)

VOCAB = 128
LAYERS = 3
LENGTHS = (8, 5, 3)  # real tokens per sequence; the batch is padded to 8
ATOL = 1e-5
# Weights larger than the HF default (0.02) so that a wrong mask or position shows in the output.
INIT = 0.2
_TOKENS = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 0}
_LLAMA_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _configs() -> dict[str, PretrainedConfig]:
    common = {"vocab_size": VOCAB, "initializer_range": INIT, **_TOKENS}
    return {
        # word_embed_proj_dim != hidden_size, so project_in / project_out exist.
        "opt": OPTConfig(
            hidden_size=32,
            word_embed_proj_dim=16,
            num_hidden_layers=LAYERS,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            init_std=INIT,
            **common,
        ),
        "gpt2": GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, **common),
        "llama-tied": LlamaConfig(tie_word_embeddings=True, **_LLAMA_SIZES, **common),
        "llama-untied": LlamaConfig(tie_word_embeddings=False, **_LLAMA_SIZES, **common),
        # Sliding windows shorter than the sequence, so the sliding masks matter.
        "qwen2-sliding": Qwen2Config(
            use_sliding_window=True, sliding_window=3, max_window_layers=1, **_LLAMA_SIZES, **common
        ),
        "mistral": MistralConfig(sliding_window=3, **_LLAMA_SIZES, **common),
        "qwen3": Qwen3Config(head_dim=8, tie_word_embeddings=True, **_LLAMA_SIZES, **common),
    }


CONFIGS = _configs()
IMPLEMENTATIONS = ("eager", "sdpa")


def _model(name: str, attn: str = "sdpa") -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name], attn_implementation=attn).eval()


def _batch(padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, L) ids and mask; the same real tokens whichever side is padded."""
    generator = torch.Generator().manual_seed(1)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        tokens = torch.randint(3, VOCAB, (length,), generator=generator)
        span = slice(width - length, width) if padding_side == "left" else slice(0, length)
        ids[row, span] = tokens
        mask[row, span] = 1
    return ids, mask


def _reference(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return out.logits.log_softmax(-1)  # (S, L, V)


def _assert_close_at_real_tokens(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


def test_position_ids_from_mask_ignores_padding_side() -> None:
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(right).tolist() == [[0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(left).dtype == torch.long


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_split_matches_unsplit_model_at_every_layer(name: str, attn: str) -> None:
    model = _model(name, attn)
    n = num_layers(model)
    assert n == LAYERS
    with torch.no_grad():
        for padding_side in ("left", "right"):
            ids, mask = _batch(padding_side)
            want = _reference(model, ids, mask)
            for k in range(n + 1):
                client, server = split_model(model, k)
                assert client.split_layer == server.split_layer == k
                acts = client(ids, mask)
                assert isinstance(acts, Activations)
                assert acts.attention_mask.dtype == acts.position_ids.dtype == torch.long
                got = server.head(server(acts)).log_softmax(-1)
                _assert_close_at_real_tokens(got, want, mask)
            unsplit = unsplit_model(model)
            got = unsplit.head(unsplit(ids, mask)).log_softmax(-1)
            _assert_close_at_real_tokens(got, want, mask)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_client_hidden_is_the_models_hidden_state_after_block_k_minus_1(name: str) -> None:
    model = _model(name)
    ids, mask = _batch("left")
    with torch.no_grad():
        states = model(
            ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            output_hidden_states=True,
        ).hidden_states
        # states[N] has the final norm applied by some families, so compare k < N.
        for k in range(num_layers(model)):
            client, _ = split_model(model, k)
            _assert_close_at_real_tokens(client(ids, mask).hidden, states[k], mask)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_left_and_right_padding_give_the_same_tokens(name: str) -> None:
    model = _model(name)
    client, server = split_model(model, 1)
    results = []
    with torch.no_grad():
        for padding_side in ("left", "right"):
            ids, mask = _batch(padding_side)
            out = server.head(server(client(ids, mask))).log_softmax(-1)
            results.append(out[mask.bool()])  # (real tokens, V), in sequence order
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parts_partition_the_models_parameters(name: str) -> None:
    model = _model(name)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == bool(CONFIGS[name].tie_word_embeddings)
    model_params = {id(p) for p in model.parameters()}
    for k in range(num_layers(model) + 1):
        client, server = split_model(model, k)
        client_params = {id(p) for p in client.parameters()}
        server_params = {id(p) for p in server.parameters()}
        assert not client_params & server_params
        if tied:
            assert id(server.head.weight) not in model_params
            server_params.discard(id(server.head.weight))
        else:
            assert server.head is model.get_output_embeddings()
        assert client_params | server_params == model_params
        # No shared buffers either (rotary tables): each side can move to its own device.
        assert not {id(b) for b in client.buffers()} & {id(b) for b in server.buffers()}
        assert id(model.get_input_embeddings().weight) in client_params
    unsplit = unsplit_model(model)
    unsplit_params = [id(p) for p in unsplit.parameters()]
    assert len(unsplit_params) == len(model_params) and set(unsplit_params) == model_params
    assert unsplit.head is model.get_output_embeddings()


@pytest.mark.parametrize("name", ["opt", "gpt2", "llama-tied", "qwen3"])
def test_tied_head_is_the_servers_own_copy(name: str) -> None:
    model = _model(name)
    embedding = model.get_input_embeddings().weight
    _, server = split_model(model, 2)
    head = server.head.weight
    assert head is not embedding and head.data_ptr() != embedding.data_ptr()
    assert head.shape == embedding.shape and server.head.bias is None
    torch.testing.assert_close(head, embedding, atol=0, rtol=0)
    before = embedding.detach().clone()
    with torch.no_grad():
        head.add_(1.0)
    torch.testing.assert_close(embedding.detach(), before, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["opt", "gpt2", "llama-untied", "mistral"])
def test_server_trains_on_activations_from_an_inference_mode_client(name: str) -> None:
    model = _model(name)
    client, server = split_model(model, 1)
    ids, mask = _batch("left")
    with torch.inference_mode():
        acts = client(ids, mask)
    loss = server.head(server(acts)).logsumexp(-1)[mask.bool()].mean()
    loss.backward()
    assert all(p.grad is not None for p in server.parameters())
    assert all(p.grad is None for p in client.parameters())


@pytest.mark.parametrize("name", ["opt", "gpt2", "qwen2-sliding"])
def test_gradient_flows_back_across_the_cut(name: str) -> None:
    model = _model(name)
    client, server = split_model(model, 2)
    ids, mask = _batch("right")
    acts = client(ids, mask)
    server.head(server(acts)).logsumexp(-1)[mask.bool()].mean().backward()
    embedding = model.get_input_embeddings().weight
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    assert all(p.grad is not None for p in client.blocks.parameters())


@pytest.mark.parametrize("k", [-1, LAYERS + 1, 1.5, True])
def test_bad_split_layer_is_a_config_error_naming_the_range(k: object) -> None:
    model = _model("llama-tied")
    with pytest.raises(ConfigError, match=f"from 0 to {LAYERS}"):
        split_model(model, k)  # type: ignore[arg-type]


def test_unknown_model_type_is_a_model_load_error_listing_supported_types() -> None:
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global"], 2]],
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ModelLoadError, match="gpt_neo") as raised:
        split_model(model, 1)
    message = str(raised.value)
    assert "\n" not in message
    assert all(t in message for t in supported_model_types())
    with pytest.raises(ModelLoadError):
        unsplit_model(model)
    with pytest.raises(ModelLoadError):
        num_layers(config)


def test_supported_model_types_and_num_layers() -> None:
    types = supported_model_types()
    assert types == sorted(types)
    assert {"opt", "llama", "qwen2", "mistral", "gpt2"} <= set(types)
    for config in CONFIGS.values():
        assert num_layers(config) == LAYERS
