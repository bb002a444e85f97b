"""Adapters over the network: `hosl serve --set server.adapter=lora` and `hosl client --set
client.adapter=lora` train what the same run trains in process; `hosl eval` and `hosl export` of
the client's run with `--server-run` give the same predictions."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from hosl.cli import main
from test_export import _plain_scores
from test_grpc_processes import _losses, _state, _train_args, server

ADAPTERS = ["--set", "client.adapter=lora"]


def test_lora_on_both_sides_over_grpc_equals_in_process_and_exports(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    reference = tmp_path / "reference"
    assert main(["train", *_train_args(tiny_model_dir, sentiment_files, reference, 4),
                 *ADAPTERS, "--set", "server.adapter=lora"]) == 0
    srv = tmp_path / "server"
    with server(tiny_model_dir, srv, "--set", "server.adapter=lora") as (proc, port):
        address = f"127.0.0.1:{port}"
        first, second = tmp_path / "first", tmp_path / "second"
        # the server's adapter is the server's setting: a client that names one is refused
        assert main(["client", "--server", address, *ADAPTERS, "--set", "server.adapter=lora",
                     *_train_args(tiny_model_dir, sentiment_files, tmp_path / "x", 2)]) == 2
        assert "hosl serve --set server.adapter=lora" in capsys.readouterr().err
        assert main(["client", "--server", address, *ADAPTERS,
                     *_train_args(tiny_model_dir, sentiment_files, first, 2)]) == 0
        # a fresh client replays steps 0..1 from the journal, from the adapter its seed gives
        assert main(["client", "--server", address, *ADAPTERS,
                     *_train_args(tiny_model_dir, sentiment_files, second, 4)]) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert _losses(second) == pytest.approx(_losses(reference), abs=1e-6)
    expected = _state(reference)
    got = {"client": _state(second)["client"], "server": _state(srv)["server"]}
    for side, count in (("client", 4), ("server", 8)):  # q and v's A and B, 1 and 2 blocks
        a, b = expected[side]["part"], got[side]["part"]
        assert a.keys() == b.keys() and len(a) == count
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{side} {key}")
    summary = json.loads((second / "summary.json").read_text())
    assert summary["client_trainable_params"] == json.loads(
        (reference / "summary.json").read_text())["client_trainable_params"]
    assert summary["server_trainable_params"] is None  # another process's

    capsys.readouterr()
    common = ["--eval-examples", "-1", "--server-run", str(srv)]
    assert main(["eval", "--run", str(second), *common, "--output", str(tmp_path / "e")]) == 0
    ours = [json.loads(x) for x in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert main(["export", str(second), "--output", str(tmp_path / "hf")]) == 2
    assert f"hosl export {second} --server-run SERVER_DIR" in capsys.readouterr().err
    assert main(["export", str(second), "--output", str(tmp_path / "hf"),
                 "--server-run", str(srv)]) == 0
    record = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert record["merged_lora_layers"] == 6 and record["untied_embedding_and_head"]
    plain = _plain_scores(tmp_path / "hf", sentiment_files[1])
    assert len(ours) == len(plain) == 32
    for p, s in zip(ours, plain):
        assert max(abs(a - b) for a, b in zip(p["scores"], s)) < 1e-4


def test_a_client_ahead_of_its_server_restarts_from_the_adapter_its_seed_gives(
    tiny_model_dir, tmp_path
) -> None:
    """A client with no checkpoint at or before the server's step goes back to the pretrained
    model and rebuilds its adapter from the run's seed, to replay from there."""
    from types import SimpleNamespace

    from hosl.build import build_run
    from hosl.config import load_config
    from hosl.models.loading import load_pretrained
    from hosl.remote import RemoteSession
    from hosl.transport.base import WireStats

    cfg = load_config(None, {"model.name": str(tiny_model_dir), "model.split_layer": 1,
                             "client.adapter": "lora"})
    fresh = build_run(cfg, load_pretrained(str(tiny_model_dir))[0])
    run = build_run(cfg, load_pretrained(str(tiny_model_dir))[0])
    with torch.no_grad():
        for p in run.client.part.parameters():
            p.add_(1.0)  # trained far away, base and adapters alike
    transport = SimpleNamespace(stats=WireStats())
    session = RemoteSession(run, cfg, transport, tmp_path, batches=lambda step: [])
    assert session._restore(5) == 0
    a, b = fresh.client.part.state_dict(), run.client.part.state_dict()
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_serve_refuses_client_settings_it_would_ignore(
    tiny_model_dir, tmp_path, capsys, monkeypatch
) -> None:
    """client.* configures a process `hosl serve` never runs: refused by name, before the model
    loads and before anything is written (as a client refuses server.*)."""
    import hosl.serve

    def no_load(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(hosl.serve, "load_pretrained", no_load)
    out = tmp_path / "server"
    args = ["serve", "--mode", "fo", "--model", str(tiny_model_dir), "--split-layer", "1",
            "--port", "0", "--output", str(out), "--set", "server.adapter=lora"]
    assert main([*args, "--set", "client.adapter=lora", "--set", "client.lora_targets=[q_proj]",
                 "--set", "client.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "client.adapter, client.lora_targets, client.lr configure the client" in err
    assert not out.exists()
    # the same settings at their defaults are no setting at all: the model loads
    with pytest.raises(AssertionError, match="the model was loaded"):
        main([*args, "--set", "client.adapter=none", "--set", "client.lr=null"])
