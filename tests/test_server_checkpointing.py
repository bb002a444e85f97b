"""Server activation checkpointing (`server.checkpointing`): the server recomputes each block's
activations in its backward instead of storing them. It must train exactly as the plain server
does — the same step without checkpointing is the reference — while keeping far less for the
backward, in process and in `hosl serve`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hosl.serve
from hosl.build import build_run
from hosl.config import ServerConfig, load_config
from hosl.errors import ConfigError
from test_zo_wiring import MODELS, _batches, _cfg


def _saved_bytes_during(step) -> int:
    """Bytes autograd saves for backward while `step` runs (the ZO client of hosl saves none)."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(saved)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("mode", ["hosl", "fo", "frozen"])
def test_a_checkpointed_server_trains_exactly_like_a_plain_one(tokenizer, family, mode) -> None:
    # AdamW with weight decay, so that any difference in any gradient moves a parameter.
    base = _cfg(mode, k=1, q=2)
    base = dataclasses.replace(
        base, optim=dataclasses.replace(base.optim, optimizer="adamw", lr=1e-2, weight_decay=0.1)
    )
    plain = build_run(base, MODELS[family]())
    lean = build_run(
        dataclasses.replace(base, server=ServerConfig(checkpointing=True)), MODELS[family]()
    )
    saved = {}
    for step in range(2):
        batches = _batches(tokenizer, step, 1)
        for name, run in (("plain", plain), ("lean", lean)):
            saved[name] = _saved_bytes_during(lambda r=run, b=batches, s=step: r.train_step(b, s))
    for party in ("server", "client"):
        ours = getattr(lean, party).part.named_parameters()
        reference = dict(getattr(plain, party).part.named_parameters())
        for name, param in ours:
            torch.testing.assert_close(param, reference[name], rtol=0, atol=1e-6,
                                       msg=f"{party} {name}")
    start = MODELS[family]().state_dict()
    names = lean.server.part.model_names
    assert any(not torch.equal(start[names[n]], p) for n, p in lean.server.part.named_parameters())
    if mode != "fo":  # only the server records a graph: its saved activations shrink
        assert saved["lean"] < saved["plain"] / 2, saved


def test_hosl_serve_honours_server_checkpointing(monkeypatch) -> None:
    """`hosl serve` builds its server part through the same choice as an in-process run."""
    monkeypatch.setattr(hosl.serve, "load_pretrained", lambda name, dtype: (MODELS["opt"](), None))

    def blocks_checkpointing(overrides: dict) -> list[bool]:
        cfg = load_config(None, {"model.name": "tiny", "model.split_layer": 1, **overrides})
        party, _, _ = hosl.serve.build_server_party(cfg)
        return [m.checkpointing for m in party.part.modules() if hasattr(m, "checkpointing")]

    assert blocks_checkpointing({"server.checkpointing": True}) == [True]
    assert blocks_checkpointing({}) == [False]


def test_hosl_serve_reads_server_checkpointing_from_set_and_yaml(monkeypatch, tmp_path) -> None:
    """From the command line to the server part: `--set` and a config file both reach it."""
    from hosl import cli

    built: list[list[bool]] = []

    def fake_serve(cfg, opts, **kwargs) -> int:
        party, _, _ = hosl.serve.build_server_party(cfg)
        built.append([m.checkpointing for m in party.part.modules()
                      if hasattr(m, "checkpointing")])
        return 0

    monkeypatch.setattr(hosl.serve, "load_pretrained", lambda name, dtype: (MODELS["opt"](), None))
    monkeypatch.setattr(hosl.serve, "serve", fake_serve)
    config = tmp_path / "run.yaml"
    config.write_text("mode: fo\nmodel:\n  split_layer: 1\nserver:\n  checkpointing: true\n")
    assert cli.main(["serve", "--set", "server.checkpointing=true", "--split-layer", "1"]) == 0
    assert cli.main(["serve", "--config", str(config)]) == 0
    assert cli.main(["serve", "--split-layer", "1"]) == 0
    assert built == [[True], [True], [False]]


@pytest.mark.parametrize("mode", ["zo", "fo-full", "zo-full"])
def test_server_checkpointing_without_a_backpropagating_server_is_refused(mode) -> None:
    with pytest.raises(ConfigError, match="server.checkpointing .* no server that backprop"):
        load_config(None, {"mode": mode, "server.checkpointing": True})
