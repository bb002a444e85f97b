"""`hosl train` end to end on a tiny model: the run directory, resume, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import hosl.trainer
from hosl.checkpoint import read_checkpoint
from hosl.cli import main
from hosl.config import load_config
from hosl.optim import SCHEDULES
from hosl.rundir import claim_dir
from hosl.trainer import make_run_dir


def _train(tiny_model_dir: Path, files: tuple[Path, Path], out: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--task",
            "sst2",
            "--train-file",
            str(files[0]),
            "--eval-file",
            str(files[1]),
            "--split-layer",
            "1",
            "--batch-size",
            "8",
            "--max-length",
            "16",
            "--q",
            "2",
            "--client-lr",
            "5e-3",
            "--server-lr",
            "0.1",
            "--optimizer",
            "adamw",
            "--output",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "mode,extra",
    [("hosl", ()), ("hosl", ("--estimator", "cut-grad")), ("fo", ()), ("zo", ()), ("frozen", ()),
     ("fo-full", ()), ("zo-full", ())],
)
def test_train_writes_the_run_directory(
    tiny_model_dir, sentiment_files, tmp_path, mode, extra
) -> None:
    out = tmp_path / "run"
    assert (
        _train(
            tiny_model_dir,
            sentiment_files,
            out,
            "--mode",
            mode,
            "--steps",
            "3",
            "--eval-every",
            "2",
            *extra,
        )
        == 0
    )
    assert {"config.yaml", "metrics.jsonl", "summary.json", "predictions.jsonl", "checkpoints"} <= {
        p.name for p in out.iterdir()
    }
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "mode",
        "model",
        "task",
        "split_layer",
        "q",
        "steps",
        "eval_accuracy",
        "client_peak_bytes",
        "server_peak_bytes",
        "wire_bytes",
        "round_trips",
        "wall_seconds",
        "seconds_per_step",
    ):
        assert key in summary
    assert summary["mode"] == mode and summary["steps"] == 3
    assert summary["client_peak_bytes"] > 0
    if mode in ("hosl", "fo", "zo", "frozen"):
        assert summary["round_trips"] == 3 and summary["wire_bytes"] > 0
        assert summary["server_peak_bytes"] > 0
        assert ("zo_estimate" in summary["client_phase_peaks"]) == (mode in ("hosl", "zo"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    assert [x["step"] for x in lines if "eval_accuracy" in x] == [2, 3]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 32 and {"index", "scores", "prediction", "label"} <= set(preds[0])
    accuracy = sum(p["prediction"] == p["label"] for p in preds) / len(preds)
    assert accuracy == pytest.approx(summary["eval_accuracy"])


def _final_state(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return read_checkpoint(run / "checkpoints" / latest)


def _flat(state: object, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(state, torch.Tensor):
        out[prefix] = state
    return out


@pytest.mark.parametrize("mode", ["hosl", "fo"])
def test_resume_equals_uninterrupted(tiny_model_dir, sentiment_files, tmp_path, mode) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(tiny_model_dir, sentiment_files, straight, "--mode", mode, "--steps", "6") == 0
    assert _train(tiny_model_dir, sentiment_files, split, "--mode", mode, "--steps", "3") == 0
    assert main(["train", "--resume", str(split), "--steps", "6", "--no-progress"]) == 0
    a, b = _flat(_final_state(straight)), _flat(_final_state(split))
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key
    s = json.loads((split / "summary.json").read_text())
    assert s["steps"] == 6 and s["round_trips"] == 6


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--split-layer", "99"], "split_layer must be between 0 and 3"),
        (["--q", "0"], "zo.q"),
        (["--eps", "0"], "zo.eps"),
        (["--client-lr", "-1"], "zo.lr"),
        (["--server-lr", "0"], "optim.lr"),
        (["--zo-lr", "0"], "zo.lr (the ZO learning rate, --zo-lr)"),
        (["--fo-lr", "-1"], "optim.lr (the FO learning rate, --fo-lr)"),
        (["--optimizer", "lion"], "optim.optimizer must be one of sgd, momentum, adamw"),
        (["--set", "zo.qq=3"], "unknown config key zo.qq"),
        (["--mode", "sideways"], "mode must be one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tiny_model_dir, sentiment_files, tmp_path, capsys, args, needle
) -> None:
    out = tmp_path / "run"
    assert _train(tiny_model_dir, sentiment_files, out, "--steps", "1", *args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing written half-way


def test_missing_train_file_is_reported(tiny_model_dir, sentiment_files, tmp_path, capsys) -> None:
    missing = (tmp_path / "nope.jsonl", sentiment_files[1])
    assert _train(tiny_model_dir, missing, tmp_path / "run", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and len(err.strip().splitlines()) == 1


def _all_leaves(state: object, prefix: str = "") -> dict[str, object]:
    """Every leaf of a checkpoint state: tensors and the schedulers' and optimizers' numbers."""
    out: dict[str, object] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_all_leaves(v, f"{prefix}{k}."))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_all_leaves(v, f"{prefix}{i}."))
    else:
        out[prefix] = state
    return out


def _stop_at(run: Path, step: int) -> None:
    """Make a finished run look like one stopped right after checkpointing `step`."""
    root = run / "checkpoints"
    for path in root.glob("step-*"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    (root / "latest").write_text(f"step-{step}")
    for name in ("summary.json", "predictions.jsonl"):
        (run / name).unlink()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("mode", ["fo", "hosl"])
def test_resume_is_exact_with_every_schedule(
    tiny_model_dir, sentiment_files, tmp_path, mode, schedule
) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--mode", mode, "--schedule", schedule, "--steps", "4")
    assert _train(tiny_model_dir, sentiment_files, straight, *common) == 0
    assert _train(
        tiny_model_dir, sentiment_files, split, *common, "--checkpoint-every", "2"
    ) == 0
    _stop_at(split, 2)
    assert main(["train", "--resume", str(split), "--no-progress"]) == 0
    a, b = _all_leaves(_final_state(straight)), _all_leaves(_final_state(split))
    assert a.keys() == b.keys()
    assert any("optimizer.state" in k for k in a)  # the optimizer's moments are compared too
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_resume_refuses_to_change_a_schedules_horizon(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    assert _train(tiny_model_dir, sentiment_files, run, "--schedule", "linear", "--steps", "2") == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "linear schedule" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_to_fewer_or_equal_steps_is_refused(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    assert _train(tiny_model_dir, sentiment_files, run, "--steps", "4") == 0
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    for steps, needle in (("2", "already at step 4"), ("4", "nothing to do")):
        assert main(["train", "--resume", str(run), "--steps", steps, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # nothing written
    assert not (run / "checkpoints" / "step-2").exists()


def test_a_used_output_is_refused_before_the_model_loads(
    tiny_model_dir, sentiment_files, tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(hosl.trainer, "load_pretrained", no_model)
    assert _train(tiny_model_dir, sentiment_files, out, "--steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_default_run_directories_are_unique(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hosl.trainer, "stamp", lambda: "20250101-120000")  # the same second
    cfg = load_config(None, {"mode": "hosl", "data.task": "rt"})
    first, second = make_run_dir(cfg), make_run_dir(cfg)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name == "hosl-rt-20250101-120000" and second.name == "hosl-rt-20250101-120000-2"


def test_claim_dir_gives_each_caller_its_own_directory(tmp_path) -> None:
    claimed = {claim_dir(tmp_path / "runs", "same") for _ in range(5)}
    assert len(claimed) == 5 and all(p.is_dir() for p in claimed)
