"""Every study in experiments/ plans without error, and run_all.sh's reuse of client_share runs
in the lora study is sound: a copied run is only skipped when its configuration is identical."""

from dataclasses import replace
from pathlib import Path

import pytest

from hosl.config import to_dict
from hosl.results import flatten
from hosl.sweep import plan_sweep

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
STUDIES = sorted(p for p in EXPERIMENTS.glob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_every_study_plans(study: Path, tmp_path: Path) -> None:
    plan = plan_sweep(study, output_root=tmp_path)
    assert plan.runs, f"{study.name} plans no run"
    assert len({r.name for r in plan.runs}) == len(plan.runs), "two runs share a directory"


def test_the_lora_study_reuses_exactly_the_client_share_runs_it_names(tmp_path: Path) -> None:
    lora = {r.name: r for r in plan_sweep(EXPERIMENTS / "lora.yaml", output_root=tmp_path).runs}
    share = {
        r.name: r
        for r in plan_sweep(EXPERIMENTS / "client_share.yaml", output_root=tmp_path).runs
    }
    script = (EXPERIMENTS / "run_all.sh").read_text()
    reused = [name for name in share if f'"{name}"' in script and name in lora]
    assert len(reused) == 4  # the frozen and full-ZO-client runs at k = 24, both seeds
    for name in reused:
        # The sweep skips a finished run only when every field but `output` matches.
        a = flatten(to_dict(replace(lora[name].config, output="")))
        b = flatten(to_dict(replace(share[name].config, output="")))
        assert a == b, name
