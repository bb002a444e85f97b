"""`hosl eval` on a base model (split or not) and on a trained run."""

from __future__ import annotations

import json
from pathlib import Path

from hosl.cli import main


def _preds(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_eval_split_equals_unsplit_and_matches_a_run(tiny_model_dir, sentiment_files, tmp_path,
                                                     capsys) -> None:
    common = ["--model", str(tiny_model_dir), "--task", "sst2",
              "--eval-file", str(sentiment_files[1]), "--max-length", "16"]
    assert main(["eval", *common, "--output", str(tmp_path / "whole")]) == 0
    assert main(["eval", *common, "--split-layer", "2", "--output", str(tmp_path / "split")]) == 0
    whole, split = _preds(tmp_path / "whole" / "predictions.jsonl"), _preds(
        tmp_path / "split" / "predictions.jsonl")
    assert len(whole) == 32 and [p["prediction"] for p in whole] == [p["prediction"] for p in split]
    for a, b in zip(whole, split):
        assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) < 1e-4

    run = tmp_path / "run"
    assert main(["train", *common, "--train-file", str(sentiment_files[0]), "--steps", "3",
                 "--split-layer", "1", "--server-lr", "0.05", "--batch-size", "8",
                 "--output", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 3 and result["split_layer"] == 1
    trained = _preds(run / "predictions.jsonl")
    again = _preds(run / "eval-sst2" / "predictions.jsonl")
    assert [p["scores"] for p in trained] == [p["scores"] for p in again]
    assert [p["scores"] for p in trained] != [p["scores"] for p in whole]  # training changed it
    summary = json.loads((run / "summary.json").read_text())
    assert result["eval_accuracy"] == summary["eval_accuracy"]


def test_eval_rejects_model_with_run(tmp_path, capsys) -> None:
    (tmp_path / "config.yaml").write_text("mode: hosl\n")
    assert main(["eval", "--run", str(tmp_path), "--model", "x"]) == 2
    assert "drop --model" in capsys.readouterr().err
