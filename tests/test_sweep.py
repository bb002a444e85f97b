"""`hosl sweep` on a tiny model: run directories, the results table, skip, resume, validation."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

import hosl.build
import hosl.trainer
from hosl.config import load_config
from hosl.errors import ConfigError, HoslError
from hosl.results import aggregate, analytic_client_params, client_params, collect
from hosl.sweep import plan_sweep, run_name, run_sweep

GRID_NAMES = [
    f"mode={mode},model.split_layer={k}" for mode in ("hosl", "fo") for k in (1, 2)
]


def _base(model_dir: Path, files: tuple[Path, Path], **extra) -> dict:
    return {
        "steps": 2,
        "batch_size": 8,
        "memory_steps": 1,
        "model": {"name": str(model_dir), "split_layer": 1},
        "data": {"task": "sst2", "train_file": str(files[0]), "eval_file": str(files[1]),
                 "max_length": 16},
        "zo": {"q": 1, "lr": 5e-3},
        "optim": {"lr": 0.05},
        **extra,
    }


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    monkeypatch.setattr(hosl.trainer, "train", lambda *a, **k: calls.append((a, k)))
    return calls


@pytest.fixture(scope="module")
def grid_sweep(tiny_model_dir, sentiment_files, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A 2x2 grid (mode x k), run once for the tests of this module."""
    root = tmp_path_factory.mktemp("grid")
    spec = {
        "name": "tiny",
        "base": _base(tiny_model_dir, sentiment_files),
        "grid": {"mode": ["hosl", "fo"], "model.split_layer": [1, 2]},
    }
    sweep = _write(root / "sweep.yaml", spec)
    out = root / "out"
    lines: list[str] = []
    results = run_sweep(sweep, dry_run=False, output_root=out, echo=lines.append, progress=False)
    return sweep, results, lines


def test_grid_sweep_writes_every_run_and_the_table(grid_sweep) -> None:
    sweep, results, _ = grid_sweep
    out = results.parent
    assert results == out / "results.md" and results.is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(GRID_NAMES)
    for name in GRID_NAMES:
        summary = json.loads((out / name / "summary.json").read_text())
        mode, k = name.split(",")[0][5:], int(name.split("=")[-1])
        assert summary["mode"] == mode and summary["split_layer"] == k and summary["steps"] == 2
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == GRID_NAMES  # the grid's order
    for row in rows:
        summary = json.loads((out / row["run"] / "summary.json").read_text())
        assert row["mode"] == summary["mode"]
        assert int(row["split_layer"]) == summary["split_layer"]
        assert float(row["eval_accuracy"]) == pytest.approx(summary["eval_accuracy"])
        assert int(row["client_peak_bytes"]) == summary["client_peak_bytes"]
        assert row["seed"] == "0" and row["q"] == "1"
    table = results.read_text()
    assert all(f"| {name} |" in table for name in GRID_NAMES)


def test_client_params_from_checkpoint_match_the_analytic_count(grid_sweep) -> None:
    out = grid_sweep[1].parent
    rows = {r["run"]: r for r in collect([out])}
    for name in GRID_NAMES:
        k = int(name.split("=")[-1])
        counted = client_params(out / name, rows[name])
        assert counted == rows[name]["client_params"]
        assert counted == analytic_client_params(rows[name]["model.name"], k)
    one, two = rows[GRID_NAMES[0]]["client_params"], rows[GRID_NAMES[1]]["client_params"]
    assert two > one > 0  # one more block on the client


def test_rerun_skips_finished_runs(grid_sweep, monkeypatch) -> None:
    sweep, results, _ = grid_sweep
    calls = _forbid_training(monkeypatch)
    lines: list[str] = []
    run_sweep(sweep, dry_run=False, output_root=results.parent, echo=lines.append)
    assert calls == []
    assert sum("skipped" in line for line in lines) == 4


def test_table_only_trains_nothing_and_tables_the_finished_runs(grid_sweep, monkeypatch,
                                                               tmp_path) -> None:
    sweep, results, _ = grid_sweep
    out = tmp_path / "out"
    shutil.copytree(results.parent, out)
    (out / "results.csv").unlink()
    unfinished = sorted(p for p in out.iterdir() if (p / "summary.json").is_file())[0]
    (unfinished / "summary.json").unlink()  # as if it were still training
    before = sorted(p.name for p in unfinished.iterdir())
    calls = _forbid_training(monkeypatch)
    lines: list[str] = []
    run_sweep(sweep, dry_run=False, output_root=out, echo=lines.append, table_only=True)
    assert calls == []
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert sorted(r["run"] for r in rows) == sorted(
        p.name for p in out.iterdir() if (p / "summary.json").is_file())
    assert len(rows) == 3 and unfinished.name not in {r["run"] for r in rows}
    assert sorted(p.name for p in unfinished.iterdir()) == before  # left as it was


def test_changed_config_of_a_finished_run_is_an_error(grid_sweep, monkeypatch) -> None:
    sweep, results, _ = grid_sweep
    calls = _forbid_training(monkeypatch)
    with pytest.raises(ConfigError, match=r"optim\.lr differ"):
        run_sweep(sweep, dry_run=False, output_root=results.parent, echo=lambda _: None,
                  overrides={"optim.lr": 0.5})
    assert calls == []


def test_more_steps_extend_finished_runs_from_their_checkpoints(grid_sweep) -> None:
    sweep, results, _ = grid_sweep
    plan = plan_sweep(sweep, output_root=results.parent, overrides={"steps": "3"})
    assert [r.action for r in plan.runs] == ["extend"] * 4
    with pytest.raises(ConfigError, match="steps differ"):  # fewer steps cannot be undone
        plan_sweep(sweep, output_root=results.parent, overrides={"steps": 1})


def test_dry_run_lists_the_plan_and_writes_nothing(tiny_model_dir, sentiment_files, tmp_path,
                                                   monkeypatch) -> None:
    calls = _forbid_training(monkeypatch)
    spec = {"base": _base(tiny_model_dir, sentiment_files),
            "runs": [{"mode": "hosl"}, {"mode": "zo", "zo.q": 2}]}
    lines: list[str] = []
    run_sweep(_write(tmp_path / "s.yaml", spec), dry_run=True, output_root=tmp_path / "out",
              echo=lines.append)
    assert calls == [] and not (tmp_path / "out").exists()
    assert any("mode=zo,zo.q=2: would run" in line for line in lines)


def test_crashed_run_is_resumed_from_its_checkpoint(tiny_model_dir, sentiment_files, tmp_path,
                                                    monkeypatch) -> None:
    spec = {"base": _base(tiny_model_dir, sentiment_files, steps=3, checkpoint_every=1),
            "runs": [{"mode": "hosl"}]}
    sweep, out = _write(tmp_path / "s.yaml", spec), tmp_path / "out"
    real_step = hosl.build.Run.train_step

    def crash_at_step_2(self, batches, step):
        if step == 2:
            raise RuntimeError("power cut")
        return real_step(self, batches, step)

    with monkeypatch.context() as patch:
        patch.setattr(hosl.build.Run, "train_step", crash_at_step_2)
        with pytest.raises(HoslError, match="1 of 1 runs failed"):
            run_sweep(sweep, dry_run=False, output_root=out, echo=lambda _: None, progress=False)
    run_dir = out / "mode=hosl"
    assert "power cut" in (run_dir / "error.log").read_text()
    assert not (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert plan_sweep(sweep, output_root=out).runs[0].action == "resume"

    lines: list[str] = []
    run_sweep(sweep, dry_run=False, output_root=out, echo=lines.append, progress=False)
    assert any(line == f"resumed {run_dir} at step 2" for line in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["round_trips"] == 3  # counters carried over
    assert not (run_dir / "error.log").exists()


def test_directory_without_checkpoint_is_restarted(tiny_model_dir, sentiment_files,
                                                   tmp_path) -> None:
    spec = {"base": _base(tiny_model_dir, sentiment_files), "runs": [{"seed": 1}]}
    sweep, out = _write(tmp_path / "s.yaml", spec), tmp_path / "out"
    (out / "seed=1").mkdir(parents=True)
    (out / "seed=1" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert plan_sweep(sweep, output_root=out).runs[0].action == "restart"
    (out / "seed=1" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        plan_sweep(sweep, output_root=out)


def test_an_interrupted_many_client_run_is_restarted(tiny_model_dir, sentiment_files,
                                                     tmp_path) -> None:
    """A many-client run writes its clients' data (`clients/`) first: a sweep stopped before the
    run finished must restart it, not refuse the directory as someone else's."""
    spec = {"base": _base(tiny_model_dir, sentiment_files, clients={"n": 2}), "runs": [{"seed": 1}]}
    sweep, out = _write(tmp_path / "s.yaml", spec), tmp_path / "out"
    run_sweep(sweep, dry_run=False, output_root=out, echo=lambda _: None, progress=False)
    run_dir = out / "seed=1"
    assert (run_dir / "clients" / "partition.json").is_file()
    for end in ("summary.json", "predictions.jsonl"):  # what a run writes when it finishes
        (run_dir / end).unlink()
    shutil.rmtree(run_dir / "checkpoints")  # stopped before its first checkpoint
    assert plan_sweep(sweep, output_root=out).runs[0].action == "restart"
    run_sweep(sweep, dry_run=False, output_root=out, echo=lambda _: None, progress=False)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize(
    "grid,needle",
    [
        ({"mode": ["hosl"], "zo.q": [1, 0]}, r"run 2 \(mode=hosl,zo\.q=0\): zo\.q"),
        ({"model.split_layer": [1, 9]}, r"model\.split_layer=9\): split_layer must be between 0 "
                                        "and 3"),
        ({"data.task": ["sst2", "nope"]}, r"data\.task=nope\): unknown task"),
        ({"zo.qq": [1]}, "unknown config key zo.qq"),
    ],
)
def test_invalid_configuration_fails_before_any_run(tiny_model_dir, sentiment_files, tmp_path,
                                                    monkeypatch, grid, needle) -> None:
    calls = _forbid_training(monkeypatch)
    spec = {"base": _base(tiny_model_dir, sentiment_files), "grid": grid}
    with pytest.raises(ConfigError, match=needle) as err:
        run_sweep(_write(tmp_path / "s.yaml", spec), dry_run=False,
                  output_root=tmp_path / "out", echo=lambda _: None)
    assert calls == [] and not (tmp_path / "out").exists()
    assert len(str(err.value).splitlines()) == 1


def test_sweep_file_shape_errors(tmp_path) -> None:
    for spec, needle in (
        ({"grid": {"seed": [0]}, "runs": [{}]}, "either grid"),
        ({"grid": {"seed": 0}}, "non-empty list"),
        ({"runs": [{"seed": 0}, {"seed": 0}]}, "repeats run 1"),
        ({"runs": [{"output": "x"}]}, "output is set by the sweep"),
        ({"grid": {"seed": [0]}, "extra": 1}, "unknown key extra"),
        ({"base": "missing.yaml", "grid": {"seed": [0]}}, "missing.yaml does not exist"),
    ):
        with pytest.raises(ConfigError, match=needle):
            plan_sweep(_write(tmp_path / "s.yaml", spec), output_root=tmp_path / "out")


def test_base_file_list_of_grids_and_exponent_floats(tmp_path) -> None:
    (tmp_path / "base.yaml").write_text("steps: 5\nzo:\n  lr: 1e-6\n")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "base: base.yaml\n"
        "set: {batch_size: 4, data.max_length: 32}\n"
        "grid:\n"
        "  - {mode: [fo, fo-full], optim.lr: [1e-5, 3e-5]}\n"
        "  - {mode: [zo], zo.lr: [1e-7]}\n"
    )
    plan = plan_sweep(sweep, output_root=tmp_path / "out", overrides={"zo.eps": "1e-4"})
    assert all(r.config.zo.eps == 1e-4 for r in plan.runs)  # command-line text, read as YAML
    assert [r.name for r in plan.runs] == [
        "mode=fo,optim.lr=1e-05", "mode=fo,optim.lr=3e-05",
        "mode=fo-full,optim.lr=1e-05", "mode=fo-full,optim.lr=3e-05", "mode=zo,zo.lr=1e-07",
    ]
    assert plan.runs[0].config.zo.lr == 1e-6 and plan.runs[0].config.steps == 5
    assert all(r.config.batch_size == 4 and r.config.data.max_length == 32 for r in plan.runs)
    assert plan.runs[1].config.optim.lr == 3e-5 and plan.runs[4].config.zo.lr == 1e-7
    assert plan.runs[0].config.output == str(tmp_path / "out" / "mode=fo,optim.lr=1e-05")
    assert plan.swept_keys == ["mode", "optim.lr", "zo.lr"]
    assert plan.output_root == tmp_path / "out"


def test_run_names_are_deterministic_safe_and_distinct() -> None:
    assert run_name({"seed": 0, "mode": "hosl"}) == run_name({"mode": "hosl", "seed": 0})
    assert run_name({"mode": "hosl", "seed": 0}) == "mode=hosl,seed=0"
    assert run_name({}) == "base"
    a, b = run_name({"data.train_file": "a/b.jsonl"}), run_name({"data.train_file": "a:b.jsonl"})
    assert a != b and "/" not in a and ":" not in b
    long = run_name({f"key{i}": "x" * 20 for i in range(10)})
    assert len(long) <= 100 and long != run_name({f"key{i}": "x" * 20 for i in range(9)})


def test_aggregate_mean_and_spread_over_seeds() -> None:
    rows = [
        {"mode": "hosl", "seed": 0, "eval_accuracy": 0.5, "seconds_per_step": 2.0},
        {"mode": "fo", "seed": 0, "eval_accuracy": 0.8, "seconds_per_step": None},
        {"mode": "hosl", "seed": 1, "eval_accuracy": 0.7, "seconds_per_step": 4.0},
        {"mode": "hosl", "seed": 2, "eval_accuracy": 0.9, "seconds_per_step": 3.0},
    ]
    hosl, fo = aggregate(rows, ["mode"], ["eval_accuracy", "seconds_per_step"])
    assert hosl["mode"] == "hosl" and hosl["n"] == 3
    assert hosl["eval_accuracy_mean"] == pytest.approx(0.7)
    assert hosl["eval_accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert hosl["eval_accuracy_std"] == pytest.approx(0.2)
    assert (hosl["eval_accuracy_min"], hosl["eval_accuracy_max"]) == (0.5, 0.9)
    assert hosl["seconds_per_step_mean"] == pytest.approx(3.0)
    assert fo["n"] == 1 and fo["eval_accuracy_mean"] == 0.8 and fo["eval_accuracy_std"] is None
    assert fo["seconds_per_step_mean"] is None


def test_report_of_a_real_sweep(grid_sweep, tmp_path) -> None:
    from hosl.report import make_report

    written = make_report([grid_sweep[1].parent], tmp_path / "report")
    assert {p.name for p in written} == {
        "loss_vs_step.png", "accuracy_vs_step.png", "accuracy_vs_split_layer.png",
        "client_memory_vs_split_layer.png", "accuracy_vs_client_params.png",
    }


def test_shards_split_the_runs_between_processes(tiny_model_dir, sentiment_files, tmp_path,
                                                 monkeypatch) -> None:
    trained: list[str] = []
    monkeypatch.setattr(hosl.trainer, "train",
                        lambda cfg, **_: trained.append(Path(cfg.output).name))
    spec = {"base": _base(tiny_model_dir, sentiment_files),
            "grid": {"mode": ["hosl", "fo", "zo"], "seed": [0, 1]}}
    sweep = _write(tmp_path / "s.yaml", spec)
    names = [r.name for r in plan_sweep(sweep, output_root=tmp_path / "out").runs]
    by_shard = []
    for index in (1, 2):
        trained.clear()
        run_sweep(sweep, dry_run=False, output_root=tmp_path / "out", echo=lambda _: None,
                  progress=False, shard=(index, 2))
        by_shard.append(list(trained))
    assert by_shard == [names[0::2], names[1::2]]


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shard_is_a_config_error(text) -> None:
    from hosl.sweep import parse_shard

    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)
    assert parse_shard(" 2/3 ") == (2, 3)


def test_tables_blank_the_settings_a_mode_never_reads(tmp_path) -> None:
    from hosl.results import write_results

    rows = [{"run": f"{mode}-{seed}", "mode": mode, "seed": seed, "zo.lr": 1e-6, "optim.lr": 3e-5,
             "eval_accuracy": 0.5 + seed / 10} for mode in ("fo", "zo") for seed in (0, 1)]
    csv_path, md_path = write_results(rows, tmp_path, ["mode", "zo.lr", "optim.lr", "seed"], "t")
    table = {r["run"]: r for r in csv.DictReader(csv_path.read_text().splitlines())}
    assert table["fo-0"]["zo.lr"] == "" and table["fo-0"]["optim.lr"] == "3e-05"
    assert table["zo-1"]["optim.lr"] == "" and table["zo-1"]["zo.lr"] == "1e-06"
    mean_rows = md_path.read_text().split("## Mean over seeds")[1]
    assert "| fo | - | 3e-05 | 2 |" in mean_rows and "| zo | 1e-06 | - | 2 |" in mean_rows


# (key, a value other than its default, what the key needs beside it to be valid at all)
SETTINGS = [
    ("server.checkpointing", True, {}),
    ("server.adapter", "lora", {}),
    ("server.lora_rank", 4, {"server.adapter": "lora"}),
    ("server.lora_targets", "q_proj", {"server.adapter": "lora"}),
    ("client.adapter", "lora", {}),
    ("client.lora_alpha", 4.0, {"client.adapter": "lora"}),
    ("client.checkpointing", True, {}),
    ("client.lr", 0.5, {}),
]


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo", "frozen", "fo-full", "zo-full"])
def test_tables_blank_exactly_the_adapter_and_checkpointing_keys_a_mode_refuses(mode) -> None:
    """The oracle is the config's own validation: a key whose value a mode refuses is one the
    mode never reads, so its (default) value must be blank in that mode's rows; a key the mode
    accepts is read and must show."""
    from hosl.config import TrainConfig, to_dict
    from hosl.results import effective, flatten

    for key, value, needs in SETTINGS:
        try:
            cfg = load_config(None, {"mode": mode, key: value, **needs})
        except ConfigError:
            row = {**flatten(to_dict(TrainConfig())), "mode": mode}
            assert effective(row)[key] is None, f"{mode} refuses {key} but shows it"
        else:
            assert effective(flatten(to_dict(cfg)))[key] == value, f"{mode} reads {key}: hidden"


def test_tables_blank_lora_settings_without_lora_and_client_settings_of_one_client() -> None:
    from hosl.config import TrainConfig, to_dict
    from hosl.results import effective, flatten

    plain = effective(flatten(to_dict(TrainConfig())))
    assert plain["client.lora_rank"] is None and plain["server.lora_targets"] is None
    assert plain["clients.partition"] is None and plain["clients.n"] == 1
    cfg = load_config(None, {"server.adapter": "lora", "clients.n": 3})
    both = effective(flatten(to_dict(cfg)))
    assert both["server.lora_rank"] == 8 and both["client.lora_rank"] is None
    assert both["clients.partition"] == "iid"
