"""`hosl train` end to end on a tiny model: the run directory, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hosl.cli import main


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


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo", "fo-full", "zo-full"])
def test_train_writes_the_run_directory(tiny_model_dir, sentiment_files, tmp_path, mode) -> None:
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
    if mode in ("hosl", "fo", "zo"):
        assert summary["round_trips"] == 3 and summary["wire_bytes"] > 0
        assert summary["server_peak_bytes"] > 0
        assert "zo_estimate" in summary["client_phase_peaks"] or mode == "fo"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    assert [x["step"] for x in lines if "eval_accuracy" in x] == [2, 3]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 32 and {"index", "scores", "prediction", "label"} <= set(preds[0])
    accuracy = sum(p["prediction"] == p["label"] for p in preds) / len(preds)
    assert accuracy == pytest.approx(summary["eval_accuracy"])


def _final_state(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest / "state.pt", weights_only=True)


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
