"""The checkpoint directory on disk: each party's trained tensors in a safetensors file, the rest
in a small `training_state.pt`, tied tensors written once, and an earlier run's single `state.pt`
still resumed exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import assert_same_state, state_leaves
from hosl.checkpoint import (
    latest_step,
    load_latest,
    parameter_count,
    read_checkpoint,
    save_checkpoint,
)
from hosl.cli import main


def _train(model_dir: Path, files: tuple[Path, Path], out: Path, *extra: str) -> int:
    return main(["train", "--model", str(model_dir), "--task", "sst2", "--train-file",
                 str(files[0]), "--eval-file", str(files[1]), "--split-layer", "1",
                 "--batch-size", "8", "--max-length", "16", "--q", "2", "--zo-lr", "5e-3",
                 "--fo-lr", "0.05", "--optimizer", "adamw", "--eval-examples", "8",
                 "--output", str(out), "--no-progress", *extra])


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_an_unsplit_tied_model_is_written_once_and_resumes_exactly(
    tiny_model_dir, sentiment_files, tmp_path
) -> None:
    """fo-full trains the tiny model's one tied embedding/head matrix: the file holds it once
    (safetensors refuses shared tensors), reading gives it back under both names, and a resumed
    run ends bit for bit where a straight one does."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--mode", "fo-full")
    assert _train(tiny_model_dir, sentiment_files, straight, *common, "--steps", "4") == 0
    assert _train(tiny_model_dir, sentiment_files, resumed, *common, "--steps", "2") == 0
    assert main(["train", "--resume", str(resumed), "--steps", "4", "--no-progress"]) == 0

    step = _latest(straight)
    assert {p.name for p in step.iterdir()} == {"full.safetensors", "training_state.pt",
                                                "meta.json"}
    with safe_open(step / "full.safetensors", framework="pt") as handle:
        stored = set(handle.keys())
    state = read_checkpoint(step)
    part = state["full"]["part"]
    tied = {"embedding.embed_tokens.weight", "head.weight"}  # the unsplit part's names
    assert tied <= set(part) and len(stored & tied) == 1 and stored == set(part) - (tied - stored)
    assert torch.equal(part["embedding.embed_tokens.weight"], part["head.weight"])
    # the file is the model's parameters once: the tied matrix is not in it twice
    from conftest import tiny_llama

    unique = sum(p.numel() * 4 for p in tiny_llama().parameters())  # float32, tied counted once
    assert unique < (step / "full.safetensors").stat().st_size < unique + 64 * 1024
    assert "optimizer" in state["full"] and "optimizer" not in state_leaves(state["full"]["part"])
    assert_same_state(state, read_checkpoint(_latest(resumed)))


def test_a_run_of_the_earlier_single_file_layout_resumes_exactly(
    tiny_model_dir, sentiment_files, tmp_path
) -> None:
    """A checkpoint written as one `state.pt` (the earlier layout) is read as before: the run
    resumes to the straight run's state, and its next checkpoint has the new layout."""
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert _train(tiny_model_dir, sentiment_files, straight, "--steps", "4") == 0
    assert _train(tiny_model_dir, sentiment_files, old, "--steps", "2") == 0
    step = _latest(old)
    state = read_checkpoint(step)
    count = parameter_count(step, "client")
    for path in step.iterdir():
        if path.name != "meta.json":
            path.unlink()
    torch.save(state, step / "state.pt")  # what hosl wrote before: everything in one file
    assert parameter_count(step, "client") == count
    assert_same_state(read_checkpoint(step), state)

    assert main(["train", "--resume", str(old), "--steps", "4", "--no-progress"]) == 0
    assert {p.name for p in _latest(old).iterdir()} == {
        "client.safetensors", "server.safetensors", "training_state.pt", "meta.json"}
    assert_same_state(read_checkpoint(_latest(straight)), read_checkpoint(_latest(old)))


@pytest.mark.parametrize("lost,message", [
    ("training_state.pt", "step-2 named by"), ("server.safetensors", "lacks server.safetensors")])
def test_a_checkpoint_with_a_file_gone_is_refused_with_one_line(
    tiny_model_dir, sentiment_files, tmp_path, capsys, lost, message
) -> None:
    run = tmp_path / "run"
    assert _train(tiny_model_dir, sentiment_files, run, "--steps", "2") == 0
    (_latest(run) / lost).unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "cannot resume" in err and len(err.splitlines()) == 1


def test_parameter_count_reads_the_header(tiny_model_dir, sentiment_files, tmp_path) -> None:
    run = tmp_path / "run"
    assert _train(tiny_model_dir, sentiment_files, run, "--steps", "1") == 0
    state = read_checkpoint(_latest(run))
    for party in ("client", "server"):
        expected = sum(t.numel() for t in state[party]["part"].values())
        assert parameter_count(_latest(run), party) == expected > 0
    assert parameter_count(_latest(run), "nobody") is None


def _state(value: float) -> dict:
    return {"server": {"part": {"w": torch.full((2, 3), value)}, "step": int(value)}}


def test_a_save_of_the_same_step_interrupted_between_its_renames_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server saves step N at a session's end and again, with more of the log, later: `latest`
    names step-N throughout. A crash while the new step-N replaces the old must leave a checkpoint
    that resumes, the old one; an uninterrupted save leaves only the new one."""
    save_checkpoint(tmp_path, 5, _state(1.0), {})
    real_rename = Path.rename

    def crash_on_the_second_rename(self: Path, target: Path) -> Path:
        if self.name.endswith(".partial"):
            raise OSError("killed")  # the old step-5 has already stepped aside
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_second_rename)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 5, _state(2.0), {})
    monkeypatch.undo()
    loaded = load_latest(tmp_path)
    assert loaded is not None and latest_step(tmp_path) == 5
    assert torch.equal(loaded[1]["server"]["part"]["w"], torch.full((2, 3), 1.0))
    save_checkpoint(tmp_path, 5, _state(2.0), {})  # the retry replaces it and cleans up
    loaded = load_latest(tmp_path)
    assert loaded is not None
    assert torch.equal(loaded[1]["server"]["part"]["w"], torch.full((2, 3), 2.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-5"]
