"""`hosl export`: the exported model, loaded with plain transformers, predicts what `hosl eval
--run` predicts; a tied embedding and head come back as two trained matrices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import sentiment_rows
from hosl.cli import main
from hosl.tasks import load_examples


def _plain_scores(model_dir: Path, eval_file: Path) -> list[list[float]]:
    """Each example's candidate scores from the exported model alone: the mean log-probability
    of each candidate's tokens after its prompt, one unpadded sequence at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for ex in load_examples("sst2", "test", file=str(eval_file), n=None, seed=0):
        prompt = tok(ex.prompt)["input_ids"]
        scores = []
        for cand in ex.candidates:
            ids = tok(ex.prompt + cand)["input_ids"]
            assert ids[: len(prompt)] == prompt
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]  # (L, V)
            logp = logits.float().log_softmax(-1)
            reads = [logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))]
            scores.append(sum(reads) / len(reads))
        out.append(scores)
    return out


def _hosl_eval(run: Path, out: Path, capsys, *extra: str) -> list[dict]:
    assert main(["eval", "--run", str(run), "--output", str(out), *extra]) == 0
    capsys.readouterr()
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


def _train(model_dir: Path, files: tuple[Path, Path], out: Path, mode: str, *sets: str) -> None:
    args = ["train", "--model", str(model_dir), "--task", "sst2", "--train-file", str(files[0]),
            "--eval-file", str(files[1]), "--split-layer", "1", "--batch-size", "8",
            "--max-length", "16", "--q", "2", "--zo-lr", "5e-2", "--fo-lr", "0.05",
            "--optimizer", "sgd", "--steps", "3", "--mode", mode, "--output", str(out),
            "--no-progress"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0


@pytest.mark.parametrize(
    "mode,sets",
    [
        ("hosl", ("client.adapter=lora", "server.adapter=lora", "client.lora_alpha=64")),
        ("fo", ()),  # no adapter: the embedding and the head both train, apart
        ("frozen", ()),  # nothing of the client stored: it comes from the pretrained model
        ("fo-full", ("client.adapter=lora",)),
    ],
)
def test_export_predicts_what_hosl_eval_predicts(
    tiny_model_dir, sentiment_files, tmp_path, capsys, mode, sets
) -> None:
    run = tmp_path / "run"
    _train(tiny_model_dir, sentiment_files, run, mode, *sets)
    assert main(["export", str(run), "--output", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "hf" / "export.json").read_text())
    split = not mode.endswith("-full")
    assert record["untied_embedding_and_head"] == split and ("untied" in printed) == split
    # q and v of each of the 3 blocks, when every block is adapted (the client's 1, the server's 2)
    assert record["merged_lora_layers"] == (6 if sets else 0)

    ours = _hosl_eval(run, tmp_path / "eval", capsys)
    plain = _plain_scores(tmp_path / "hf", sentiment_files[1])
    assert [p["prediction"] for p in ours] == [max(range(2), key=s.__getitem__) for s in plain]
    for p, s in zip(ours, plain):
        assert max(abs(a - b) for a, b in zip(p["scores"], s)) < 1e-4
    # the training moved the model: the export is not the base model
    base = _plain_scores(tiny_model_dir, sentiment_files[1])
    assert max(abs(a - b) for x, y in zip(base, plain) for a, b in zip(x, y)) > 1e-3

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert (embedding.data_ptr() == head.data_ptr()) != split
    if split and mode == "fo":  # both copies trained, each on its own side
        assert not torch.equal(embedding, head)


def test_export_refuses_a_used_output_and_a_run_without_checkpoint(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(
        f"mode: hosl\nmodel: {{name: {tiny_model_dir}}}\n")
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "used")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "new")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_sentiment_rows_are_the_eval_files_rows(sentiment_files) -> None:
    # _plain_scores re-reads the eval file through hosl.tasks: the same rows the fixture wrote
    rows = [json.loads(x) for x in sentiment_files[1].read_text().splitlines()]
    assert rows == sentiment_rows(32, 2)
