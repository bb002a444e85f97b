"""`hosl eval` on a base model (split or not) and on a trained run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import sentiment_rows
from hosl.checkpoint import read_checkpoint, write_checkpoint
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


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_a_users_eval_file_is_read_whole_and_in_order(tiny_model_dir, tmp_path, capsys) -> None:
    rows = sentiment_rows(600, seed=5)  # more than the 500 a built-in split is sampled to
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["eval", "--model", str(tiny_model_dir), "--task", "sst2", "--eval-file", str(data),
              "--max-length", "16", "--batch-size", "64"]
    assert main([*common, "--output", str(tmp_path / "all")]) == 0
    preds = _preds(tmp_path / "all" / "predictions.jsonl")
    assert [p["index"] for p in preds] == list(range(600))
    assert [p["label"] for p in preds] == [r["label"] for r in rows]
    assert [p["line"] for p in preds] == list(range(1, 601))
    # a sample only when asked for, and still indexed by the user's own rows
    assert main([*common, "--eval-examples", "20", "--output", str(tmp_path / "some")]) == 0
    some = _preds(tmp_path / "some" / "predictions.jsonl")
    assert len(some) == 20 and len({p["index"] for p in some}) == 20
    assert all(p["label"] == rows[p["index"]]["label"] for p in some)


def test_eval_accepts_dtype_aliases(tiny_model_dir, sentiment_files, tmp_path, capsys) -> None:
    common = ["eval", "--model", str(tiny_model_dir), "--task", "sst2",
              "--eval-file", str(sentiment_files[1]), "--max-length", "16"]
    assert main([*common, "--dtype", "bf16", "--output", str(tmp_path / "bf16")]) == 0
    assert main([*common, "--dtype", "nope", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "bf16" in err and len(err.splitlines()) == 1


def test_eval_of_a_client_run_needs_its_server_directory(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    """A `hosl client` run holds only the client's state; `--server-run` brings the server's."""
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--task", "sst2",
                 "--train-file", str(sentiment_files[0]), "--eval-file", str(sentiment_files[1]),
                 "--max-length", "16", "--steps", "2", "--split-layer", "1", "--batch-size", "8",
                 "--fo-lr", "0.05", "--output", str(run), "--no-progress"]) == 0
    # Split the in-process run into what a client and a server directory would hold.
    client, server = tmp_path / "client", tmp_path / "server"
    shutil.copytree(run, client)
    step = client / "checkpoints" / "step-2"
    state = read_checkpoint(step)
    shutil.rmtree(step)
    for side, path in (("client", step), ("server", server / "checkpoints" / "step-2")):
        path.mkdir(parents=True)
        write_checkpoint(path, {side: state[side]})
        shutil.copy(run / "checkpoints" / "step-2" / "meta.json", path)
    shutil.copy(run / "config.yaml", server / "config.yaml")
    capsys.readouterr()

    assert main(["eval", "--run", str(client)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--server-run" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["eval", "--run", str(client), "--server-run", str(server)]) == 0
    again = _preds(client / "eval-sst2" / "predictions.jsonl")
    assert [p["scores"] for p in again] == [p["scores"] for p in _preds(run / "predictions.jsonl")]
