"""`hosl memory`: the per-party table and JSON, offline built-ins, config files, bad input."""

from __future__ import annotations

import json

import pytest
from transformers import OPTConfig

from hosl.cli import main
from hosl.memory.analytic import estimate, human_bytes

ROW_LABELS = (
    "parameters",
    "gradients",
    "optimizer state",
    "stored activations",
    "transient working set",
    "ZO perturbation",
    "cut-layer activations",
    "candidate scores",
    "total (modelled peak)",
)
HOSL_125M = ["--model", "opt-125m", "--split-layer", "5", "--batch-size", "16",
             "--max-length", "64", "--mode", "hosl"]


def _memory(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["memory", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *args: str) -> dict:
    code, out, err = _memory(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_builtin_model_table_shows_every_component_for_both_parties(capsys):
    code, out, err = _memory(capsys, *HOSL_125M)
    assert code == 0 and err == ""
    est = estimate("opt-125m", split_layer=5, batch=16, length=64, mode="hosl",
                   optimizer="adamw", attention="sdpa")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("component"))
    assert header.split()[1:] == ["client", "server"]
    for label in ROW_LABELS:
        assert any(line.startswith(label) for line in lines), label
    total = next(line for line in lines if line.startswith("total (modelled peak)"))
    assert human_bytes(est.client.total) in total and human_bytes(est.server.total) in total
    params = next(line for line in lines if line.startswith("parameters"))
    assert human_bytes(est.client.components["parameters"]) in params
    assert "opt-125m" in out and "split after block 5 of 12" in out


def test_json_mode_parses_and_matches_the_analytic_model(capsys):
    payload = _json(capsys, *HOSL_125M)
    assert payload["units"] == "bytes" and payload["mode"] == "hosl"
    assert set(payload["parties"]) == {"client", "server"}
    est = estimate("opt-125m", split_layer=5, batch=16, length=64, mode="hosl",
                   optimizer="adamw", attention="sdpa")
    for party in ("client", "server"):
        got = payload["parties"][party]
        assert got["total"] == est.parties[party].total
        assert got["components"] == est.parties[party].components
    client = payload["parties"]["client"]["components"]
    assert client["gradients"] == client["optimizer_state"] == 0  # the ZO client
    assert payload["full_logits_server_total"] > payload["parties"]["server"]["total"]


def test_full_logits_server_needs_more_than_scored(capsys):
    args = ["--model", "opt-1.3b", "--split-layer", "5", "--batch-size", "16",
            "--max-length", "512", "--mode", "hosl"]
    scored = _json(capsys, *args)["parties"]
    full = _json(capsys, *args, "--logits", "full")["parties"]
    b_l_v_float32 = 16 * 512 * 50272 * 4
    assert full["server"]["total"] - scored["server"]["total"] >= b_l_v_float32
    assert full["server"]["components"]["scores"] == 512 * scored["server"]["components"]["scores"]
    assert full["client"]["total"] == scored["client"]["total"]  # the client has no head
    code, out, _ = _memory(capsys, *args, "--logits", "full")
    assert code == 0 and "full logits (B x L x V)" in out


def test_fo_split_costs_the_client_more_than_hosl(capsys):
    hosl = _json(capsys, *HOSL_125M)["parties"]["client"]["total"]
    fo = _json(capsys, *HOSL_125M[:-1], "fo")["parties"]["client"]["total"]
    assert fo > 2 * hosl


def test_unsplit_mode_has_one_party(capsys):
    payload = _json(capsys, "--model", "smollm2-135m", "--mode", "fo-full", "--optimizer", "sgd")
    assert list(payload["parties"]) == ["model"]
    model = payload["parties"]["model"]["components"]
    assert model["gradients"] == model["parameters"] and model["optimizer_state"] == 0


def test_model_directory_and_config_file_give_the_same_numbers(capsys, tmp_path):
    config = OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=4, num_attention_heads=4,
                       vocab_size=512, word_embed_proj_dim=64, max_position_embeddings=128)
    config.save_pretrained(tmp_path)
    args = ["--split-layer", "2", "--mode", "hosl", "--batch-size", "8", "--max-length", "32"]
    from_dir = _json(capsys, "--model", str(tmp_path), *args)
    from_file = _json(capsys, "--model", str(tmp_path / "config.json"), *args)
    assert from_dir["parties"] == from_file["parties"]
    est = estimate(config, split_layer=2, batch=8, length=32, mode="hosl", optimizer="adamw",
                   attention="sdpa")
    assert from_dir["parties"]["server"]["total"] == est.server.total


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "gpt-7"], "unknown model"),
        (["--model", "opt-125m", "--mode", "hosl"], "--split-layer"),
        (["--model", "opt-125m", "--mode", "fo", "--split-layer", "13"], "outside 0..12"),
        (["--model", "opt-125m", "--mode", "sideways"], "unknown mode"),
        (["--model", "opt-125m", "--mode", "fo-full", "--dtype", "float8"], "dtype"),
        (["--model", "opt-125m", "--mode", "fo-full", "--optimizer", "lion"], "optimizer"),
        (["--model", "opt-125m", "--mode", "fo-full", "--batch-size", "0"], "at least 1"),
        (["--model", "opt-125m", "--mode", "hosl", "--split-layer", "2", "--q", "0"],
         "at least 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, message):
    code, out, err = _memory(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("hosl: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_bad_config_paths_exit_2(capsys, tmp_path):
    code, _, err = _memory(capsys, "--model", str(tmp_path), "--mode", "fo-full")
    assert code == 2 and "no config.json" in err
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    code, _, err = _memory(capsys, "--model", str(broken), "--mode", "fo-full")
    assert code == 2 and "cannot read a model config" in err
    assert len(err.strip().splitlines()) == 1
    broken.write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    code, _, err = _memory(capsys, "--model", str(tmp_path), "--mode", "fo-full")
    assert code == 2 and "bert" in err
