"""The analytic memory model against exact measurement on tiny models, and its bookkeeping."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

from hosl.errors import ConfigError
from hosl.memory.analytic import COMPONENTS, estimate, format_estimate, human_bytes
from hosl.memory.measure import PartyMeter
from hosl.models.configs import builtin_config, builtin_config_names

TOLERANCE = 0.15
VOCAB = 256


def _tiny_config(family: str, *, layers: int = 2, hidden: int = 64, inter: int = 128):
    if family == "llama":
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
            max_position_embeddings=256, tie_word_embeddings=True,
        )
    if family == "opt":
        return OPTConfig(
            hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=256, word_embed_proj_dim=hidden,
            dropout=0.0, attention_dropout=0.0,
        )
    return GPT2Config(
        n_embd=hidden, n_inner=inter, n_layer=layers, n_head=4, vocab_size=VOCAB,
        n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )


def _tiny_model(config, attention: str = "eager"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention)


def _decoder(model):
    """The decoder stack without the head: last_hidden_state is (B, L, H)."""
    base = model.model if hasattr(model, "model") else model.transformer
    return getattr(base, "decoder", base)


def _batch(batch: int, length: int):
    ids = torch.randint(0, VOCAB, (batch, length))
    return ids, torch.full((batch,), length - 1), torch.randint(0, VOCAB, (batch,))


def _scored_loss(model, ids, positions, targets):
    """Cross-entropy at one position per sequence: no (B, L, V) tensor is ever made."""
    hidden = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state  # (B, L, H)
    picked = hidden[torch.arange(ids.shape[0]), positions]  # (B, H)
    return torch.nn.functional.cross_entropy(model.lm_head(picked).float(), targets)


def _measure_inference(model, batch: int, length: int) -> int:
    ids, positions, _ = _batch(batch, length)
    model.eval()
    meter = PartyMeter("model")
    meter.set_resident_state(model)
    with torch.inference_mode(), meter.phase("forward"):
        hidden = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden[torch.arange(batch), positions])
        torch.log_softmax(logits.float(), dim=-1)
    return meter.peak_bytes


def _measure_fo(model, batch: int, length: int) -> int:
    ids, positions, targets = _batch(batch, length)
    model.train()
    meter = PartyMeter("model")
    meter.set_resident_state(model)
    with meter.phase("forward"):
        loss = _scored_loss(model, ids, positions, targets)
    with meter.phase("backward"):
        loss.backward()
    return meter.peak_bytes


CALIBRATION_SHAPES = [(2, 4, 64), (3, 2, 128)]  # (layers, batch, length)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("shape", CALIBRATION_SHAPES)
@pytest.mark.parametrize("mode", ["inference", "fo-full"])
def test_analytic_total_is_within_15_percent_of_measured_peak(family, shape, mode):
    layers, batch, length = shape
    config = _tiny_config(family, layers=layers)
    model = _tiny_model(config)
    measure = _measure_inference if mode == "inference" else _measure_fo
    measured = measure(model, batch, length)
    modelled = estimate(config, mode=mode, batch=batch, length=length).parties["model"].total
    assert abs(modelled / measured - 1) < TOLERANCE, (modelled, measured)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sdpa_estimate_is_within_15_percent_of_measured_peak(family):
    config = _tiny_config(family, layers=2)
    model = _tiny_model(config, attention="sdpa")
    for mode, measure in (("inference", _measure_inference), ("fo-full", _measure_fo)):
        measured = measure(model, 4, 64)
        est = estimate(config, mode=mode, batch=4, length=64, attention="sdpa")
        assert abs(est.parties["model"].total / measured - 1) < TOLERANCE, (mode, measured)
    eager = estimate(config, mode="fo-full", batch=4, length=64, attention="eager")
    assert est.parties["model"].components["stored_activations"] < eager.parties[
        "model"
    ].components["stored_activations"]


def test_zo_full_phases_match_a_mezo_style_step():
    config = _tiny_config("llama", layers=2)
    model = _tiny_model(config).eval()
    ids, positions, targets = _batch(4, 64)
    meter = PartyMeter("model")
    meter.set_resident_state(model)
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for param in model.parameters():  # one tensor at a time, in place
            with meter.phase("perturb"):
                z = torch.randn(param.shape, generator=generator)
                param.add_(z, alpha=1e-3)
                del z
        with meter.phase("forward"):
            _scored_loss(model, ids, positions, targets)
    est = estimate(config, mode="zo-full", batch=4, length=64).parties["model"]
    for phase, measured in meter.phase_peaks().items():
        assert abs(est.phases[phase] / measured - 1) < TOLERANCE, (phase, measured)


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", builtin_config_names())
def test_builtin_configs_have_the_published_parameter_counts(name):
    published = {"opt-125m": 125_239_296, "opt-1.3b": 1_315_758_080, "smollm2-135m": 134_515_008}
    model = _meta_model(builtin_config(name))
    assert sum(p.numel() for p in model.parameters()) == published[name]
    est = estimate(name, mode="fo-full", dtype="float32")
    assert est.parties["model"].components["parameters"] == 4 * published[name]


def test_builtin_config_shapes_and_errors():
    assert builtin_config_names() == ["opt-1.3b", "opt-125m", "smollm2-135m"]
    opt = builtin_config("OPT-125M")
    assert (opt.num_hidden_layers, opt.hidden_size, opt.ffn_dim, opt.vocab_size) == (
        12, 768, 3072, 50272,
    )
    smol = builtin_config("smollm2-135m")
    assert (smol.num_hidden_layers, smol.num_attention_heads, smol.num_key_value_heads) == (
        30, 9, 3,
    )
    assert smol.tie_word_embeddings and smol.rope_parameters["rope_theta"] == 100000.0
    with pytest.raises(ConfigError, match="opt-125m"):
        builtin_config("gpt-5")


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_split_parameters_match_the_modules_each_party_owns(family):
    model = _meta_model(_tiny_config(family, layers=4))
    decoder = _decoder(model)
    blocks = decoder.layers if hasattr(decoder, "layers") else decoder.h
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    input_names = ("embed", "wte", "wpe", "project_in")
    input_side = [p for n, p in decoder.named_parameters()
                  if id(p) not in in_blocks and any(k in n for k in input_names)]
    output_side = [p for p in model.parameters()
                   if id(p) not in in_blocks and all(p is not q for q in input_side)]
    head = model.get_output_embeddings().weight
    tied_copy = head.numel() if any(head is p for p in input_side) else 0

    def count(params) -> int:
        return sum(p.numel() for p in params)

    client = count(input_side) + count(blocks[0].parameters())
    server = count(output_side) + tied_copy + sum(count(b.parameters()) for b in blocks[1:])
    est = estimate(model.config, split_layer=1, mode="fo", batch=1, length=8)
    assert est.client.components["parameters"] == 4 * client
    assert est.server.components["parameters"] == 4 * server


def test_modes_give_each_party_the_right_components():
    kw = dict(split_layer=3, batch=16, length=256, optimizer="adamw")
    hosl = estimate("opt-125m", mode="hosl", **kw)
    fo = estimate("opt-125m", mode="fo", **kw)
    zo = estimate("opt-125m", mode="zo", **kw)
    inference = estimate("opt-125m", mode="inference", **kw)
    embedding_bytes = 50272 * 768 * 4
    client = hosl.client.components
    assert client["gradients"] == client["optimizer_state"] == client["stored_activations"] == 0
    # The embedding's noise is drawn per row: the 4096 looked-up rows and their (B, L, E)
    # gather, not the (V, E) matrix; the server's head copy is drawn whole (its rows are all used).
    tokens = 16 * 256
    assert client["perturbation"] == tokens * 768 * 4 + tokens * 768 * 4 < embedding_bytes
    server = hosl.server.components
    assert server["gradients"] == server["parameters"]
    assert server["optimizer_state"] == 2 * server["parameters"]
    assert "eval" in hosl.server.phases
    assert fo.client.components["stored_activations"] > 0
    assert zo.server.components["gradients"] == zo.server.components["optimizer_state"] == 0
    assert zo.server.components["perturbation"] == embedding_bytes  # the server's head copy
    # The design's targets at these shapes: HOSL client near inference, far below FO-FO's.
    assert hosl.client.total <= 1.15 * inference.client.total
    assert fo.client.total >= 2 * hosl.client.total
    short = dict(kw, split_layer=5, length=64)  # SST-2-like, where the noise used to dominate
    hosl_short = estimate("opt-125m", mode="hosl", **short).client.total
    assert hosl_short <= 1.05 * estimate("opt-125m", mode="inference", **short).client.total
    assert estimate("opt-125m", mode="fo", **short).client.total >= 4 * hosl_short
    assert set(fo.parties) == {"client", "server"}
    assert set(estimate("opt-125m", mode="fo-full").parties) == {"model"}


def test_full_logits_scale_with_length_and_dtype_halves_parameters():
    kw = dict(mode="hosl", split_layer=2, batch=16, length=512)
    scored = estimate("opt-1.3b", **kw)
    full = estimate("opt-1.3b", logits="full", **kw)
    assert full.server.components["scores"] == 512 * scored.server.components["scores"]
    assert scored.client.components["scores"] == 0
    assert full.server.total - scored.server.total >= full.server.components["scores"]
    half = estimate("opt-1.3b", dtype="bfloat16", **kw)
    assert 2 * half.server.components["parameters"] == scored.server.components["parameters"]


def test_split_layer_moves_memory_between_parties():
    early = estimate("smollm2-135m", mode="fo", split_layer=2, batch=4, length=128)
    late = estimate("smollm2-135m", mode="fo", split_layer=20, batch=4, length=128)
    assert late.client.components["stored_activations"] > early.client.components[
        "stored_activations"
    ]
    assert late.server.total < early.server.total


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="sideways", split_layer=1),
        dict(mode="hosl"),  # a split mode without a split layer
        dict(mode="hosl", split_layer=99),
        dict(mode="fo", split_layer=1, dtype="float8"),
        dict(mode="fo", split_layer=1, optimizer="lion"),
        dict(mode="fo", split_layer=1, logits="some"),
        dict(mode="fo", split_layer=1, attention="flash"),
        dict(mode="fo", split_layer=1, batch=0),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        estimate("opt-125m", **kwargs)


def test_unknown_architecture_raises_config_error():
    config = _tiny_config("llama")
    config.model_type = "mamba"
    with pytest.raises(ConfigError, match="mamba"):
        estimate(config, mode="fo-full")


def test_format_estimate_shows_every_component_for_every_party():
    est = estimate("opt-125m", mode="hosl", split_layer=3, batch=16, length=256)
    text = format_estimate(est)
    assert "client" in text and "server" in text and "opt-125m" in text
    for component in COMPONENTS:
        assert component.replace("_", " ") in text
    row = next(line for line in text.splitlines() if line.startswith("total (peak)"))
    assert human_bytes(est.client.total) in row and human_bytes(est.server.total) in row
    assert human_bytes(1536) == "1.50 KiB" and human_bytes(3 * 2**30) == "3.00 GiB"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["opt-125m", "smollm2-135m"])
def test_estimate_matches_measurement_at_real_shapes(name):
    """Random weights with the real layout (no download): the model is within 5% at full size."""
    config = builtin_config(name)
    config.dropout = 0.0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ids = torch.randint(0, config.vocab_size, (2, 128))
    meter = PartyMeter("model")
    meter.set_resident_state(model)
    with meter.phase("forward"):
        hidden = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden[:, -1])
        loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 0])
    with meter.phase("backward"):
        loss.backward()
    est = estimate(name, mode="fo-full", batch=2, length=128, attention="sdpa").parties["model"]
    assert abs(est.total / meter.peak_bytes - 1) < 0.05
