"""Config files and dotted overrides: types, unknown keys, YAML's 1e-6."""

from __future__ import annotations

import pytest

from hosl.config import dump_config, load_config
from hosl.errors import ConfigError


def test_dotted_overrides_parse_scientific_floats_and_ints(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("mode: fo\nzo:\n  lr: 1e-6\n  q: 2\n")
    cfg = load_config(path, {"zo.eps": "1e-4", "optim.lr": "3e-5", "steps": "7"})
    assert cfg.mode == "fo" and cfg.zo.q == 2 and cfg.steps == 7
    assert cfg.zo.lr == 1e-6 and cfg.zo.eps == 1e-4 and cfg.optim.lr == 3e-5
    # the resolved config written to a run directory reads back identically
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize("overrides,needle", [
    ({"zo.nope": "1"}, "unknown config key zo.nope"),
    ({"nope": "1"}, "unknown config key nope"),
    ({"steps": "many"}, "steps: expected int"),
    ({"zo": "3"}, "zo must be a mapping"),
])
def test_bad_keys_and_types_are_one_clear_line(overrides, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)
