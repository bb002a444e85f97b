"""A diverging run stops with one line and never applies a non-finite update."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama
from hosl.build import build_run
from hosl.errors import Diverged
from hosl.summary import StepTimes, build_summary
from hosl.zo import ZoTarget, apply_zo_update_
from test_cli_train import _train
from test_zo_wiring import _batches, _cfg


@pytest.mark.parametrize("mode", ["hosl", "fo", "fo-full"])
def test_a_non_finite_gradient_is_refused_before_any_parameter_changes(tokenizer, mode) -> None:
    run = build_run(_cfg(mode), tiny_llama(seed=4))
    batches = _batches(tokenizer, 0, 1)
    parts = [run.runner.part] if run.client is None else [run.client.part, run.server.part]
    with torch.no_grad():  # a poisoned weight the loss reads: NaN loss, NaN gradients
        next(p for p in parts[-1].parameters() if p.dim() == 1).fill_(float("nan"))
    before = [{k: v.clone() for k, v in part.state_dict().items()} for part in parts]
    with pytest.raises(Diverged, match="not finite"):
        run.train_step(batches, 0)
    for part, saved in zip(parts, before):
        for key, value in part.state_dict().items():
            assert torch.equal(value, saved[key]) or torch.isnan(saved[key]).any(), key


def test_a_non_finite_zo_coefficient_is_refused() -> None:
    layer = torch.nn.Linear(4, 4)
    start = layer.weight.detach().clone()
    with pytest.raises(Diverged, match="ZO projected gradient is nan"):
        apply_zo_update_(ZoTarget(layer), [(1, 0.5), (2, float("nan"))], lr=0.1)
    assert torch.equal(layer.weight, start)


def test_the_cli_says_where_training_diverged(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    code = _train(tiny_model_dir, sentiment_files, tmp_path / "run", "--mode", "fo-full",
                  "--steps", "4", "--optimizer", "sgd", "--fo-lr", "1e30")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("hosl: ") and "training diverged at step" in err[0], err


def test_a_session_that_trained_no_step_writes_valid_json(tmp_path) -> None:
    """A networked client that joins after the server finished only replays: its loss is NaN,
    which summary.json must write as null (no JSON reader accepts NaN)."""
    run = build_run(_cfg("hosl"), tiny_llama(seed=4))
    meters = {name: party.start_metering(name) for name, party in run.parties().items()}
    summary = build_summary(
        _cfg("hosl"), run, tmp_path, meters, n_eval=0, zero_shot=None, final=0.5,
        loss=float("nan"), wall_seconds=1.0, times=StepTimes(), server_address=None,
    )
    json.dumps(summary, allow_nan=False)
    assert summary["final_loss"] is None
