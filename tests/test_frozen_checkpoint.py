"""A `frozen` run's client trains nothing, so its checkpoint stores nothing of it: the client part
is rebuilt from the pretrained model at resume and export. Checked against the files themselves
(read with safetensors alone), a straight run, and a model put together by hand."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hosl.checkpoint import read_checkpoint, write_checkpoint
from hosl.cli import main
from hosl.results import client_params

K = 1  # the split layer: the tiny model's block 0 on the client, blocks 1 and 2 on the server


def _train(model_dir: Path, files: tuple[Path, Path], out: Path, steps: int) -> None:
    assert main(["train", "--model", str(model_dir), "--task", "sst2", "--train-file",
                 str(files[0]), "--eval-file", str(files[1]), "--mode", "frozen",
                 "--split-layer", str(K), "--batch-size", "8", "--max-length", "16",
                 "--fo-lr", "0.05", "--optimizer", "adamw", "--eval-examples", "8",
                 "--steps", str(steps), "--output", str(out), "--no-progress"]) == 0


def _resume(run: Path, steps: int) -> None:
    assert main(["train", "--resume", str(run), "--steps", str(steps), "--no-progress"]) == 0


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(file, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _model_name(server_name: str) -> str:
    """The whole model's name of a tiny Llama server part's tensor (its blocks count from 0)."""
    if server_name.startswith("blocks.layers."):
        index, rest = server_name.removeprefix("blocks.layers.").split(".", 1)
        return f"model.layers.{int(index) + K}.{rest}"
    return {"final.norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}[server_name]


def _straight_and_half(
    model_dir: Path, files: tuple[Path, Path], tmp_path: Path
) -> tuple[Path, Path]:
    """A straight 4-step frozen run and one stopped after 2 steps (to be resumed to 4)."""
    straight, half = tmp_path / "straight", tmp_path / "half"
    _train(model_dir, files, straight, steps=4)
    _train(model_dir, files, half, steps=2)
    return straight, half


def _assert_same_server(a: Path, b: Path) -> None:
    """The two runs' latest server checkpoints hold the same tensors, bit for bit."""
    expected = _tensors(_latest(a) / "server.safetensors")
    got = _tensors(_latest(b) / "server.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def test_a_frozen_checkpoint_holds_no_client_parameter(
    tiny_model_dir, sentiment_files, tmp_path
) -> None:
    run = tmp_path / "run"
    _train(tiny_model_dir, sentiment_files, run, steps=2)
    step = _latest(run)
    assert {p.name for p in step.iterdir()} == {
        "client.safetensors", "server.safetensors", "training_state.pt", "meta.json"}
    assert _tensors(step / "client.safetensors") == {}
    pretrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    server_names = [n for n in pretrained.state_dict()
                    if n.startswith(("model.norm.", "lm_head."))
                    or (n.startswith("model.layers.") and int(n.split(".")[2]) >= K)]
    stored = _tensors(step / "server.safetensors")
    assert sorted(map(_model_name, stored)) == sorted(server_names)  # the server's part, whole
    assert (step / "client.safetensors").stat().st_size < 1024  # a header and nothing else
    # d_c of a run still going (no summary.json) is then the client part's size, not 0
    d_c = sum(t.numel() for n, t in pretrained.state_dict().items()
              if n.startswith(("model.embed_tokens.", "model.layers.0.")))
    row = {"mode": "frozen", "model.name": str(tiny_model_dir), "model.split_layer": K}
    assert client_params(run, row) == d_c


def test_a_frozen_run_resumes_to_the_straight_runs_bits(
    tiny_model_dir, sentiment_files, tmp_path
) -> None:
    straight, resumed = _straight_and_half(tiny_model_dir, sentiment_files, tmp_path)
    _resume(resumed, steps=4)
    _assert_same_server(straight, resumed)
    # steps 3 and 4 ran on a client rebuilt from the pretrained model: same activations, losses
    losses = _losses(straight)
    assert sorted(losses) == [1, 2, 3, 4] and _losses(resumed) == losses
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["client_trainable_params"] == 0 and summary["client_params"] > 0


def test_a_checkpoint_that_holds_the_frozen_client_still_resumes(
    tiny_model_dir, sentiment_files, tmp_path
) -> None:
    """Checkpoints written before a frozen client stored nothing hold its whole part."""
    straight, old = _straight_and_half(tiny_model_dir, sentiment_files, tmp_path)
    step = _latest(old)
    state = read_checkpoint(step)
    assert state["client"]["part"] == {}
    pretrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    client = {"embedding.embed_tokens.weight": pretrained["model.embed_tokens.weight"],
              **{f"blocks.layers.0.{n.removeprefix('model.layers.0.')}": t
                 for n, t in pretrained.items() if n.startswith("model.layers.0.")}}
    state["client"]["part"] = {n: t.clone() for n, t in client.items()}
    write_checkpoint(step, state)  # as the earlier writer did: the client's whole part
    assert len(_tensors(step / "client.safetensors")) == 10
    _resume(old, steps=4)
    assert _losses(old) == _losses(straight)
    _assert_same_server(straight, old)
    assert _tensors(_latest(old) / "client.safetensors") == {}  # its next checkpoint: nothing


def test_the_export_of_a_frozen_run_is_the_pretrained_client_and_the_trained_server(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    _train(tiny_model_dir, sentiment_files, run, steps=3)
    assert main(["export", str(run), "--output", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()

    # by hand: the pretrained model's tensors, the server's from its file under the model's names
    pretrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    server = {_model_name(n): t for n, t in _tensors(_latest(run) / "server.safetensors").items()}
    expected = {n: server.get(n, t) for n, t in pretrained.items()}
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    # the server trained (its head is no longer the tied embedding); the client did not
    assert not torch.equal(exported["lm_head.weight"], exported["model.embed_tokens.weight"])
    assert not torch.equal(server["model.layers.1.mlp.up_proj.weight"],
                           pretrained["model.layers.1.mlp.up_proj.weight"])
