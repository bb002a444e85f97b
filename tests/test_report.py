"""`hosl report`: which plots are drawn for which runs, and what goes into them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from matplotlib.image import imread

from hosl.config import DataConfig, ModelConfig, TrainConfig, ZoConfig, dump_config
from hosl.errors import HoslError
from hosl.report import _curves, _points, default_out, find_runs, load_record, make_report
from hosl.results import analytic_client_params

CURVES = {"loss_vs_step.png", "accuracy_vs_step.png"}
K_PLOTS = {"accuracy_vs_split_layer.png", "client_memory_vs_split_layer.png",
           "accuracy_vs_client_params.png"}
Q_PLOTS = {"accuracy_vs_q.png", "seconds_per_step_vs_q.png"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, model: Path, *, mode: str = "hosl", k: int = 1, q: int = 1, seed: int = 0,
             accuracy: float = 0.75, steps: int = 40, finished: bool = True) -> Path:
    """A run directory as the trainer leaves it, with chosen results (no training needed)."""
    cfg = TrainConfig(mode=mode, steps=steps, seed=seed, model=ModelConfig(str(model), k),
                      data=DataConfig(task="sst2"), zo=ZoConfig(q=q))
    run_dir = root / f"{mode}-k{k}-q{q}-s{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(replace(cfg, output=str(run_dir))))
    lines = [{"step": s, "loss": 1.0 / s + 0.01 * seed} for s in range(1, steps + 1)]
    lines += [{"step": steps // 2, "eval_accuracy": (0.5 + accuracy) / 2}]
    if finished:
        lines.append({"step": steps, "eval_accuracy": accuracy})
        split = None if mode.endswith("-full") else k
        (run_dir / "summary.json").write_text(json.dumps({
            "mode": mode, "model": str(model), "task": "sst2", "split_layer": split, "q": q,
            "steps": steps, "eval_accuracy": accuracy, "zero_shot_accuracy": 0.5,
            "client_peak_bytes": (1 + k) * 2**20, "server_peak_bytes": 2**22,
            "wire_bytes": 100, "round_trips": steps, "seconds_per_step": 0.5 * q,
            "client_phase_peaks": {"forward": 1},
        }))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


def _assert_pngs(paths: list[Path], out: Path, expected: set[str]) -> None:
    assert {p.name for p in paths} == expected
    assert {p.name for p in out.glob("*.png")} == expected  # nothing skipped was written
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        pixels = imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels.std() > 0.01  # not a blank canvas
    index = (out / "report.md").read_text()
    assert all(f"]({name})" in index for name in expected)


def test_runs_differing_in_mode_k_and_q_get_every_plot(tiny_model_dir, tmp_path) -> None:
    runs = tmp_path / "runs"
    for seed in (0, 1):
        for k in (1, 2):
            fake_run(runs, tiny_model_dir, mode="hosl", k=k, seed=seed, accuracy=0.6 + 0.1 * k)
            fake_run(runs, tiny_model_dir, mode="fo", k=k, seed=seed, accuracy=0.9)
        for q in (2, 4):
            fake_run(runs, tiny_model_dir, mode="hosl", q=q, seed=seed, accuracy=0.7)
    fake_run(runs, tiny_model_dir, mode="fo-full", accuracy=0.95)
    out = tmp_path / "report"
    written = make_report([runs], out)
    _assert_pngs(written, out, CURVES | K_PLOTS | Q_PLOTS)
    assert "Not drawn" not in (out / "report.md").read_text()


def test_plots_of_a_single_value_are_skipped(tiny_model_dir, tmp_path) -> None:
    runs = [fake_run(tmp_path / "runs", tiny_model_dir, mode=m, k=4) for m in ("hosl", "fo", "zo")]
    out = tmp_path / "report"
    written = make_report(runs, out)
    _assert_pngs(written, out, CURVES)
    index = (out / "report.md").read_text()
    assert "one split layer (4)" in index and "one Q (1)" in index


def test_only_q_varies(tiny_model_dir, tmp_path) -> None:
    runs = [fake_run(tmp_path / "runs", tiny_model_dir, q=q) for q in (1, 2, 4, 8)]
    out = tmp_path / "report"
    _assert_pngs(make_report(runs, out), out, CURVES | Q_PLOTS)


def test_points_average_seeds_per_configuration(tiny_model_dir, tmp_path) -> None:
    root = tmp_path / "runs"
    for seed, acc in ((0, 0.6), (1, 0.8)):
        fake_run(root, tiny_model_dir, k=1, seed=seed, accuracy=acc)
    fake_run(root, tiny_model_dir, k=3, accuracy=0.7)
    fake_run(root, tiny_model_dir, mode="fo", k=3, accuracy=0.9)
    records = [load_record(p) for p in find_runs([root])]
    by_k = {p.label: p.values for p in _points(records, "model.split_layer", "eval_accuracy",
                                                ("model.split_layer",))}
    assert by_k == {"hosl": {1.0: [0.6, 0.8], 3.0: [0.7]}, "fo": {3.0: [0.9]}}
    by_dc = _points(records, "client_params", "eval_accuracy", ("model.split_layer",))
    d1, d3 = (analytic_client_params(str(tiny_model_dir), k) for k in (1, 3))
    assert set(by_dc[0].values) == {float(d1), float(d3)} and d3 > d1
    curves = _curves(records, "losses")
    assert [(c.label, len(c.runs)) for c in curves] == [("hosl, k=1", 2), ("hosl, k=3", 1),
                                                       ("fo, k=3", 1)]


def test_unfinished_run_draws_curves_only(tiny_model_dir, tmp_path) -> None:
    root = tmp_path / "runs"
    fake_run(root, tiny_model_dir, k=1)
    fake_run(root, tiny_model_dir, k=2, finished=False)
    out = tmp_path / "report"
    _assert_pngs(make_report([root], out), out, CURVES)  # one finished k: no k plots


def test_resumed_metrics_keep_the_last_line_per_step(tiny_model_dir, tmp_path) -> None:
    run = fake_run(tmp_path, tiny_model_dir, steps=4)
    with open(run / "metrics.jsonl", "a") as handle:  # a crash after step 4, resumed from 2
        handle.write(json.dumps({"step": 3, "loss": 7.0}) + "\n")
        handle.write(json.dumps({"step": 4, "loss": 8.0}) + "\n")
    record = load_record(run)
    assert record.losses == [(1, 1.0), (2, 0.5), (3, 7.0), (4, 8.0)]
    assert record.evals == [(0, 0.5), (2, pytest.approx(0.625)), (4, 0.75)]


def test_find_runs_and_default_out(tiny_model_dir, tmp_path) -> None:
    root = tmp_path / "sweep"
    a, b = fake_run(root, tiny_model_dir, k=1), fake_run(root, tiny_model_dir, k=2)
    assert find_runs([root]) == sorted([a, b])
    assert find_runs([a, root]) == [a, b]
    assert default_out([a, b]) == root.resolve() / "report"
    assert default_out([a]) == a / "report"
    with pytest.raises(HoslError, match="no such run directory"):
        find_runs([tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HoslError, match="no run directories"):
        make_report([empty], tmp_path / "r")


def test_a_run_held_by_two_sweeps_is_counted_once(tiny_model_dir, tmp_path) -> None:
    main, ks = tmp_path / "main", tmp_path / "split_layer"
    fake_run(main, tiny_model_dir, k=4, accuracy=0.8)
    same = fake_run(ks, tiny_model_dir, k=4, accuracy=0.8)
    fake_run(ks, tiny_model_dir, k=8, accuracy=0.7)
    out = tmp_path / "report"
    make_report([main, ks], out)
    index = (out / "report.md").read_text()
    assert "## Left out" in index and f"- {same}" in index
    assert index.startswith("# hosl report: 2 runs")
