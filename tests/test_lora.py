"""LoRA adapters per party (client.adapter, server.adapter): an adapter at B = 0 changes nothing,
each party trains exactly its adapters under their unsplit names, checkpoints hold only them and
resume exactly, and the settings that cannot work are refused with one line."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from conftest import assert_same_state, sentiment_examples, state_leaves, tiny_llama
from hosl.batching import collate
from hosl.build import build_run
from hosl.checkpoint import read_checkpoint
from hosl.cli import main
from hosl.config import TrainConfig, dump_config, load_config
from hosl.errors import ConfigError

K = 1  # tiny_llama has 3 blocks: the client holds block 0, the server blocks 1 and 2


def _cfg(mode: str, **sets: object) -> TrainConfig:
    overrides = {"mode": mode, "model.split_layer": K, "zo.q": 2, "zo.lr": 1e-2, "optim.lr": 1e-2}
    return load_config(None, {**overrides, **sets})


def _lora_names(blocks: range) -> set[str]:
    """The unsplit model's names of the default adapters (q and v projections) of `blocks`."""
    return {f"model.layers.{i}.self_attn.{m}_proj.lora_{x}.weight"
            for i in blocks for m in "qv" for x in "AB"}


def _lora_tensors(module: torch.nn.Module) -> set[int]:
    """ids of every LoRA A and B weight under `module`, found through peft's own layer type."""
    return {id(p) for m in module.modules() if isinstance(m, LoraLayer)
            for d in (m.lora_A, m.lora_B) for p in d.parameters()}


def _optimized(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _logits(run, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(S, L, V) logits through the run's parts (the head applied everywhere)."""
    with torch.no_grad():
        if run.client is None:
            part = run.runner.part
            return part.head(part(ids, mask))
        server = run.server.part
        return server.head(server(run.client.part(ids, mask)))


@pytest.mark.parametrize("mode", ["hosl", "fo-full"])
def test_an_adapter_with_b_at_zero_leaves_the_model_unchanged(tokenizer, mode) -> None:
    sets = {"client.adapter": "lora"} if mode.endswith("-full") else {
        "client.adapter": "lora", "server.adapter": "lora"}
    run = build_run(_cfg(mode, **sets), tiny_llama(seed=3))
    batch = collate(sentiment_examples(4, seed=1), tokenizer, 16, "right")
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():  # plain transformers on a fresh copy of the same weights
        expected = tiny_llama(seed=3)(ids, attention_mask=mask).logits
    torch.testing.assert_close(_logits(run, ids, mask), expected, rtol=0, atol=1e-5)
    # the adapters are in the path: a B away from zero changes the logits
    with torch.no_grad():
        for module in (run.client.part if run.client else run.runner.part).modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_(0, 0.5)
    assert (_logits(run, ids, mask) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo", "fo-full", "zo-full"])
def test_each_party_trains_exactly_its_adapters_under_their_unsplit_names(mode) -> None:
    full = mode.endswith("-full")
    sets = {"client.adapter": "lora"} if full else {
        "client.adapter": "lora", "server.adapter": "lora"}
    run = build_run(_cfg(mode, **sets), tiny_llama())
    if full:
        part, zo = run.runner.part, run.runner.zo
        assert {name for name, _ in zo.named} == _lora_names(range(3))
        assert {id(p) for _, p in zo.named} == _lora_tensors(part)
        if mode == "fo-full":
            assert _optimized(run.runner.optimizer) == _lora_tensors(part)
        return
    client, server = run.client, run.server
    assert {name for name, _ in client.zo.named} == _lora_names(range(K))  # d_c's tensors
    assert {name for name, _ in server.zo.named} == _lora_names(range(K, 3))
    assert {id(p) for _, p in client.zo.named} == _lora_tensors(client.part)
    assert {id(p) for _, p in server.zo.named} == _lora_tensors(server.part)
    if mode == "fo":
        assert _optimized(client.optimizer) == _lora_tensors(client.part)
    if mode != "zo":
        assert _optimized(server.optimizer) == _lora_tensors(server.part)


def test_adapters_start_from_the_seed_alone_and_alike_split_or_not() -> None:
    sets = {"client.adapter": "lora", "server.adapter": "lora"}
    split = build_run(_cfg("hosl", **sets), tiny_llama())
    again = build_run(_cfg("hosl", **sets), tiny_llama())
    other = build_run(_cfg("hosl", seed=1, **sets), tiny_llama())
    whole = build_run(_cfg("zo-full", **{"client.adapter": "lora"}), tiny_llama())
    torch.manual_seed(123)  # the global generator plays no part
    later = build_run(_cfg("hosl", **sets), tiny_llama())

    def values(run) -> dict[str, torch.Tensor]:
        if run.client is None:
            return dict(run.runner.zo.named)
        return {**dict(run.client.zo.named), **dict(run.server.zo.named)}

    a, whole_a = values(split), values(whole)
    assert a.keys() == whole_a.keys()
    for name, tensor in a.items():
        for twin in (values(again)[name], values(later)[name], whole_a[name]):
            assert torch.equal(twin, tensor), name
        if ".lora_B" in name:
            assert not tensor.any()  # B = 0: the adapter starts as the identity
        else:
            assert tensor.abs().max() > 0 and not torch.equal(values(other)[name], tensor)
            assert tensor.dtype == torch.float32


def _train(model_dir: Path, files: tuple[Path, Path], out: Path, *extra: str) -> int:
    return main(["train", "--model", str(model_dir), "--task", "sst2", "--train-file",
                 str(files[0]), "--eval-file", str(files[1]), "--split-layer", str(K),
                 "--batch-size", "8", "--max-length", "16", "--q", "2", "--zo-lr", "5e-2",
                 "--fo-lr", "0.05", "--output", str(out), "--no-progress", "--eval-examples",
                 "8", "--set", "client.adapter=lora", "--set", "server.adapter=lora", *extra])


def _final_state(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return read_checkpoint(run / "checkpoints" / latest)


def test_checkpoints_hold_only_the_adapters_and_resume_exactly(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_model_dir, sentiment_files, straight, "--steps", "4") == 0
    assert _train(tiny_model_dir, sentiment_files, resumed, "--steps", "2") == 0
    assert main(["train", "--resume", str(resumed), "--steps", "4", "--no-progress"]) == 0
    capsys.readouterr()

    a, b = _final_state(straight), _final_state(resumed)
    # local names of the parts: the client's block 0 is its blocks.layers.0, the server's block 1
    # is its blocks.layers.0 too
    local = {f"blocks.layers.{i}.self_attn.{m}_proj.lora_{x}.default.weight"
             for i in range(1) for m in "qv" for x in "AB"}
    assert set(a["client"]["part"]) == local
    assert set(a["server"]["part"]) == local | {
        n.replace("layers.0", "layers.1") for n in local}
    assert "optimizer" in a["server"]  # AdamW's moments of the adapters
    # on disk: each party's safetensors holds exactly its adapters, under those names, and the
    # optimizer's tensors (beside them) are the adapters' two AdamW moments and nothing more
    step = straight / "checkpoints" / "step-4"
    assert {p.name for p in step.iterdir()} == {
        "client.safetensors", "server.safetensors", "training_state.pt", "meta.json"}
    for side in ("client", "server"):
        with safe_open(step / f"{side}.safetensors", framework="pt") as handle:
            assert set(handle.keys()) == set(a[side]["part"]), side
    rest = torch.load(step / "training_state.pt", weights_only=True)
    moments = [t for t in state_leaves(rest).values()
               if isinstance(t, torch.Tensor) and t.dim() > 0]
    adapters = sorted(t.shape for t in a["server"]["part"].values())
    assert sorted(t.shape for t in moments) == sorted(adapters + adapters)
    assert_same_state(a, b)
    # the adapters moved (on both sides) and nothing else did
    for side in ("client", "server"):
        assert any(t.abs().max() > 0 for n, t in a[side]["part"].items() if "lora_B" in n), side
    summary = json.loads((straight / "summary.json").read_text())
    d_c = sum(t.numel() for t in a["client"]["part"].values())
    assert summary["client_trainable_params"] == d_c == 2 * 8 * 32 + 8 * 32 + 8 * 16
    assert summary["server_trainable_params"] == 2 * d_c
    assert summary["client_params"] > 10 * d_c


def test_a_lora_step_leaves_the_base_weights_as_they_were(tokenizer) -> None:
    sets = {"client.adapter": "lora", "server.adapter": "lora"}
    run = build_run(_cfg("hosl", **sets), tiny_llama())
    base = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    batch = collate(sentiment_examples(8, seed=2), tokenizer, 16, "right")
    run.train_step([batch], 0)
    for part in (run.client.part, run.server.part):
        for local, p in part.named_parameters():
            name = part.model_names[local]
            if "lora_" not in name:
                assert torch.equal(p, base[name]), name
    moved = [p for _, p in run.client.zo.named if p.abs().max() > 0 and p.shape[1] == 8]
    assert moved  # a client B (out × r) left zero: the ZO update reached the adapters


@pytest.mark.parametrize(
    "sets,message",
    [
        ({"mode": "frozen", "client.adapter": "lora"}, "never trains"),
        ({"mode": "zo-full", "server.adapter": "lora"}, "has no server"),
        ({"mode": "fo-full", "server.lora_rank": 4}, "server.lora_* settings need"),
        ({"client.adapter": "lora", "zo.embedding_noise": "batch"}, "embedding is frozen"),
        ({"client.adapter": "lora", "client.lora_dropout": 0.1}, "eval mode"),
        ({"client.adapter": "lora", "client.lora_rank": 0}, "lora_rank must be >= 1"),
        ({"client.adapter": "dora"}, "client.adapter must be one of none, lora"),
        ({"client.adapter": "lora", "client.lora_targets": " , "}, "names no module"),
        ({"client.lora_alpha": 4}, "need client.adapter lora"),
        ({"client.checkpointing": True}, "mode hosl has none"),
    ],
)
def test_settings_that_cannot_work_are_refused(sets, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, sets)


@pytest.mark.parametrize("sets", [
    {"client.adapter": "lora"},
    {"mode": "fo", "client.adapter": "lora", "client.checkpointing": True},
    {"mode": "fo-full", "client.adapter": "lora", "model.dtype": "bf16"},
    {"mode": "frozen", "server.adapter": "lora", "model.dtype": "bf16"},
])
def test_settings_that_work_are_accepted(sets) -> None:
    assert load_config(None, sets).mode == sets.get("mode", "hosl")


def _adapted_modules(part: torch.nn.Module) -> set[str]:
    """The names of the linear layers peft replaced under `part` (the leaf name: q_proj, ...)."""
    return {name.rsplit(".", 1)[-1] for name, m in part.named_modules() if isinstance(m, LoraLayer)}


def test_lora_targets_is_a_yaml_list_or_a_comma_string(tmp_path) -> None:
    config = tmp_path / "lora.yaml"
    config.write_text("mode: fo\nmodel: {split_layer: 1}\n"
                      "client: {adapter: lora, lora_targets: [q_proj, k_proj]}\n"
                      "server: {adapter: lora, lora_targets: [o_proj]}\n")
    listed = load_config(config, {"server.lora_targets": "[v_proj, up_proj]"})
    written = load_config(None, {"mode": "fo", "model.split_layer": 1, "client.adapter": "lora",
                                 "client.lora_targets": "q_proj,k_proj", "server.adapter": "lora",
                                 "server.lora_targets": "v_proj, up_proj"})
    run = build_run(listed, tiny_llama())
    assert _adapted_modules(run.client.part) == {"q_proj", "k_proj"}
    assert _adapted_modules(run.server.part) == {"v_proj", "up_proj"}
    other = build_run(written, tiny_llama())
    assert _adapted_modules(other.client.part) == {"q_proj", "k_proj"}
    assert _adapted_modules(other.server.part) == {"v_proj", "up_proj"}
    # the run directory's config.yaml reads back to the same settings
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(listed))
    assert load_config(saved) == listed


@pytest.mark.parametrize("value", ["[q_proj, 3]", "[]", "[q_proj, 'k_proj,v_proj']", "[q_proj"])
def test_a_lora_targets_list_of_other_things_is_refused(value) -> None:
    with pytest.raises(ConfigError, match="client.lora_targets"):
        load_config(None, {"client.adapter": "lora", "client.lora_targets": value})


def test_a_part_with_nothing_to_adapt_is_refused() -> None:
    cfg = replace(_cfg("hosl", **{"client.adapter": "lora"}),
                  model=replace(TrainConfig().model, split_layer=0))
    with pytest.raises(ConfigError, match="client.adapter lora: no module .* q_proj, v_proj"):
        build_run(cfg, tiny_llama())


def _family_model(family: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama()
    if family == "opt":
        config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                           vocab_size=40, max_position_embeddings=64, word_embed_proj_dim=32,
                           dropout=0.0, attention_dropout=0.0)
    else:
        config = GPT2Config(n_embd=32, n_inner=64, n_layer=3, n_head=4, vocab_size=40,
                            n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family,per_block", [("llama", 2), ("opt", 2), ("gpt2", 1)])
def test_each_family_adapts_its_attention_and_merges_back_into_plain_weights(
    family, per_block
) -> None:
    """Default targets per family; merged into the plain model (GPT-2's Conv1D is stored
    transposed), the adapters give the logits the adapted split model gives."""
    from hosl.models.lora import merge_adapters

    model = _family_model(family)
    run = build_run(_cfg("hosl", **{"client.adapter": "lora", "server.adapter": "lora"}), model)
    client, server = {n for n, _ in run.client.zo.named}, {n for n, _ in run.server.zo.named}
    assert len(client) == 2 * per_block and len(server) == 2 * 2 * per_block
    assert not client & server
    ids = torch.randint(3, 34, (2, 7))  # tiny_llama has 34 tokens, the others 40
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(_logits(run, ids, mask), plain, rtol=0, atol=1e-5)
        for part in (run.client.part, run.server.part):
            for module in part.modules():
                if isinstance(module, LoraLayer):
                    module.lora_B["default"].weight.normal_(0, 0.5)
        adapted = _logits(run, ids, mask)
        assert (adapted - plain).abs().max() > 1e-2
        # the server's head is the model's own or a copy equal to it: nothing trained it here
        assert merge_adapters(model) == 3 * per_block
        assert not any("lora" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, adapted,
                                   rtol=0, atol=1e-4)


def _client_change(tokenizer, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean h, (h at θ + εz) − h) / ε of a LoRA client whose base is stored in `dtype`."""
    model = tiny_llama().to(getattr(torch, dtype))
    run = build_run(_cfg("hosl", **{"client.adapter": "lora", "model.dtype": dtype}), model)
    batch = collate(sentiment_examples(4, seed=1), tokenizer, 16, "right")
    clean = run.client.activations(batch).hidden
    plus = run.client.activations(batch, seed=7, scale=1e-3).hidden
    return clean, (plus - clean) / 1e-3


def test_a_lora_client_over_a_bf16_base_computes_in_float32(tokenizer) -> None:
    """A ZO party's ε-sized change survives a bf16 base: the frozen base is cast to float32 on
    use, one module at a time, as the trainable parameters of a bf16 model are."""
    clean, change = _client_change(tokenizer, "bfloat16")
    _, exact = _client_change(tokenizer, "float32")
    assert clean.dtype == torch.float32
    assert exact.abs().max() > 0.05  # the perturbation reaches h (through B)
    # bf16 base weights are float32's rounded: the directional change agrees to a few percent
    assert (change - exact).norm() < 0.05 * exact.norm()


def test_a_checkpoint_of_other_adapters_is_refused() -> None:
    from hosl.errors import HoslError

    saved = build_run(_cfg("fo-full", **{"client.adapter": "lora"}), tiny_llama()).state_dict()
    other = build_run(_cfg("fo-full", **{"client.adapter": "lora",
                                         "client.lora_targets": "q_proj"}), tiny_llama())
    with pytest.raises(HoslError, match="the model's checkpoint does not hold this run's adapters"):
        other.load_state_dict(saved)
