"""The command line's surface: defaults in --help, flag names, dtype spellings, one source of
truth for defaults, optimizer names and the split-layer check."""

from __future__ import annotations

import argparse
import inspect

import pytest

import hosl.config
import hosl.optim
import hosl.serve
import hosl.sweep
import hosl.trainer
from hosl.cli import TRAIN_FLAGS, _config_default, _train_overrides, build_parser, main
from hosl.config import TrainConfig, check_split_layer, load_config
from hosl.errors import ConfigError


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_shows_every_default(command) -> None:
    sub = _subparsers()[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        text = formatter._get_help_string(action) or ""
        flag = action.option_strings[0]
        if command in ("train", "client", "serve") and flag in TRAIN_FLAGS:
            # config-driven flags show the config's default (argparse's default is None)
            shown = _config_default(TRAIN_FLAGS[flag][0]) is not None
        else:
            shown = action.default is not None and action.default is not False
        if shown:
            assert "(default" in text, (command, flag)


def test_help_shows_the_config_defaults() -> None:
    text = _subparsers()["train"].format_help()
    cfg = TrainConfig()
    for value in (cfg.zo.lr, cfg.optim.lr, cfg.steps, cfg.batch_size, cfg.model.split_layer):
        assert f"(default: {value})" in text


def test_defaults_are_the_rate_searches_winners() -> None:
    cfg = TrainConfig()
    assert cfg.zo.lr == 1e-4 and cfg.optim.lr == 3e-5


@pytest.mark.parametrize("new,old,key", [("--zo-lr", "--client-lr", "zo.lr"),
                                         ("--fo-lr", "--server-lr", "optim.lr")])
def test_learning_rate_flags_are_named_by_what_they_set(new, old, key) -> None:
    parser = build_parser()
    for flag in (new, old):
        args = parser.parse_args(["train", flag, "0.5"])
        assert _train_overrides(args)[key] == 0.5
    help_text = TRAIN_FLAGS[new][2]
    for mode in ("hosl", "zo", "fo-full", "zo-full"):
        assert mode in help_text
    assert new in _subparsers()["train"].format_help()
    assert ("--fo-lr" in _subparsers()["serve"].format_help()) and "--zo-lr" not in (
        _subparsers()["serve"].format_help()
    )


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16", "torch.bfloat16"])
def test_dtype_spellings_work_for_train_config_and_memory(spelling, capsys) -> None:
    assert load_config(None, {"model.dtype": spelling, "wire_dtype": "fp16"}).model.dtype == (
        "bfloat16"
    )
    args = build_parser().parse_args(["serve", "--dtype", spelling])
    assert load_config(None, _train_overrides(args, ("--dtype",))).model.dtype == "bfloat16"
    assert main(["memory", "--model", "opt-125m", "--split-layer", "2", "--dtype", spelling,
                 "--json"]) == 0
    assert '"dtype": "bfloat16"' in capsys.readouterr().out


def test_memory_refuses_an_unknown_dtype_in_one_line(capsys) -> None:
    assert main(["memory", "--split-layer", "2", "--dtype", "int3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "int3" in err and len(err.splitlines()) == 1


def test_optimizer_and_schedule_names_have_one_source() -> None:
    assert hosl.config.OPTIMIZERS is hosl.optim.OPTIMIZERS
    assert hosl.config.SCHEDULES is hosl.optim.SCHEDULES
    with pytest.raises(ConfigError, match="momentum"):
        load_config(None, {"optim.optimizer": "lion"})


def test_the_split_layer_is_checked_in_one_function() -> None:
    with pytest.raises(ConfigError, match="between 0 and 3 for m, got 4"):
        check_split_layer(4, 3, "m")
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(None, {"model.split_layer": "-1"})
    for module in (hosl.trainer, hosl.serve, hosl.sweep):
        source = inspect.getsource(module)
        assert "check_split_layer(" in source and "split_layer must be" not in source
