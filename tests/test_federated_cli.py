"""`hosl train --clients N`: client data files, the `clients` entry of summary.json, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hosl.checkpoint import read_checkpoint
from hosl.cli import main


def _train(model_dir: Path, files: tuple[Path, Path], out: Path, *extra: str) -> int:
    return main([
        "train", "--model", str(model_dir), "--task", "sst2",
        "--train-file", str(files[0]), "--eval-file", str(files[1]),
        "--split-layer", "1", "--batch-size", "8", "--max-length", "16", "--q", "2",
        "--zo-lr", "5e-3", "--fo-lr", "0.1", "--optimizer", "sgd",
        "--embedding-noise", "batch", "--output", str(out), "--no-progress", *extra,
    ])


CLIENTS = ("--clients", "3", "--partition", "dirichlet:0.5", "--client-schedule", "sequential")


def _client_state(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = read_checkpoint(run / "checkpoints" / latest)
    return state["client"]["part"]


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_three_clients_write_their_data_and_report_sync(
    tiny_model_dir, sentiment_files, tmp_path, schedule
) -> None:
    out = tmp_path / "run"
    flags = (*CLIENTS[:-1], schedule)
    assert _train(tiny_model_dir, sentiment_files, out, "--steps", "6", *flags) == 0
    rows = [json.loads(x) for x in sentiment_files[0].read_text().splitlines()]
    meta = json.loads((out / "clients" / "partition.json").read_text())
    written = []
    for c in range(3):
        lines = (out / "clients" / f"client-00{c}.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == [rows[i] for i in meta["indices"][c]]
        written += meta["indices"][c]
    assert sorted(written) == list(range(len(rows)))

    clients = json.loads((out / "summary.json").read_text())["clients"]
    assert (clients["n"], clients["rounds"], clients["log_records"]) == (3, 2, 6)
    assert clients["schedule"] == schedule
    assert [c["steps"] for c in clients["per_client"]] == [2, 2, 2]
    moved = sum(c["down_bytes"] + c["up_bytes"] for c in clients["per_client"])
    assert clients["sync_bytes_per_client_round"] == moved / 6
    assert sum(c["up_bytes"] for c in clients["per_client"]) == clients["log_bytes"]
    assert 0 < clients["sync_bytes_per_client_round"] < clients["fedavg_bytes_per_client_round"]

    # per-client accuracy: the eval set's per-label accuracy under each client's label mix
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    per_label = {}
    for y in {p["label"] for p in preds}:
        mine = [p for p in preds if p["label"] == y]
        per_label[y] = sum(p["prediction"] == y for p in mine) / len(mine)
    for c, counts in enumerate(meta["label_counts"]):
        want = sum(n * per_label[y] for y, n in enumerate(counts)) / sum(counts)
        assert abs(clients["eval_accuracy_per_client"][c] - want) < 1e-12


def test_a_resumed_many_client_run_equals_a_straight_one(
    tiny_model_dir, sentiment_files, tmp_path
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_model_dir, sentiment_files, straight, "--steps", "5", *CLIENTS) == 0
    assert _train(tiny_model_dir, sentiment_files, resumed, "--steps", "3", *CLIENTS) == 0
    assert main(["train", "--resume", str(resumed), "--steps", "5", "--no-progress"]) == 0
    a = json.loads((straight / "summary.json").read_text())["clients"]
    b = json.loads((resumed / "summary.json").read_text())["clients"]
    assert a == b
    sa, sb = _client_state(straight), _client_state(resumed)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_many_clients_are_refused_where_they_are_not_built(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    code = _train(tiny_model_dir, sentiment_files, tmp_path / "r", *CLIENTS,
                  "--server", "127.0.0.1:1")
    assert code == 2 and "in process only" in capsys.readouterr().err
    code = _train(tiny_model_dir, sentiment_files, tmp_path / "r", *CLIENTS, "--mode", "fo",
                  "--embedding-noise", "all", "--dtype", "bf16")
    assert code == 2 and "model.dtype float32" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_splitfed_clients_report_fedavg_bytes(tiny_model_dir, sentiment_files, tmp_path) -> None:
    """`--mode fo --clients 3`: SplitFed; each client moves θ_c down and up in each round."""
    out = tmp_path / "fo"
    assert _train(tiny_model_dir, sentiment_files, out, "--steps", "6", *CLIENTS[:-1],
                  "parallel", "--mode", "fo", "--embedding-noise", "all") == 0
    clients = json.loads((out / "summary.json").read_text())["clients"]
    theta = sum(t.numel() * t.element_size() for t in _client_state(out).values())
    assert (clients["sync"], clients["rounds"], clients["log_records"]) == ("fedavg", 2, 0)
    assert [c["down_bytes"] for c in clients["per_client"]] == [2 * theta] * 3
    assert [c["up_bytes"] for c in clients["per_client"]] == [2 * theta] * 3
    assert clients["sync_bytes_per_client_round"] == clients["fedavg_bytes_per_client_round"]
