"""Hub tasks via the optional `datasets` package: clear errors without it, MeZO's splits with it.

`datasets` is not installed here and the hub is unreachable, so a stand-in module records what
hosl asks for and serves numbered rows.
"""

from __future__ import annotations

import sys
import types

import pytest

from hosl.errors import DataError
from hosl.tasks import ALL, get_task, load_examples

HUB_SIZES = {"train": 250, "validation": 56}  # SuperGLUE CB's sizes


def cb_rows(split: str) -> list[dict]:
    return [
        {"premise": f"{split} premise {i}", "hypothesis": "h", "label": i % 3, "idx": i}
        for i in range(HUB_SIZES[split])
    ]


@pytest.fixture
def fake_datasets(monkeypatch):
    """A `datasets` module whose load_dataset serves numbered CB rows and logs each request."""
    requests = []

    def load_dataset(path, name, split):
        requests.append((path, name, split))
        return cb_rows(split)

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return requests


def origin(example) -> tuple[str, int]:
    words = example.prompt.split()  # "Suppose <split> premise <i> Can we infer ..."
    return words[1], int(words[3])


def test_missing_datasets_package_names_the_offline_options(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError) as err:
        load_examples("sst2", "train")
    message = str(err.value)
    assert "\n" not in message
    assert "glue/sst2" in message and "'datasets'" in message
    assert "--train-file/--eval-file" in message and "'rt'" in message


def test_unreachable_hub_is_one_line_with_the_reason_and_the_offline_options(monkeypatch):
    def load_dataset(path, name, split):
        raise ConnectionError("Couldn't reach 'super_glue' on the Hub\n(LocalEntryNotFoundError)")

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(DataError) as err:
        load_examples("boolq", "test")
    message = str(err.value)
    assert "\n" not in message
    assert "super_glue/boolq (validation)" in message
    assert "Couldn't reach 'super_glue'" in message and "--train-file/--eval-file" in message


def test_hub_names_for_every_hub_task():
    expected = {
        "sst2": ("glue", "sst2"), "rte": ("super_glue", "rte"), "cb": ("super_glue", "cb"),
        "boolq": ("super_glue", "boolq"), "wic": ("super_glue", "wic"),
        "multirc": ("super_glue", "multirc"), "copa": ("super_glue", "copa"),
        "wsc": ("super_glue", "wsc.fixed"), "rt": None,
    }
    assert {name: get_task(name).hub for name in expected} == expected


def test_test_comes_from_validation_train_and_dev_from_train(fake_datasets):
    test = load_examples("cb", "test", n=ALL, seed=0)
    train = load_examples("cb", "train", n=ALL, seed=0)
    dev = load_examples("cb", "dev", n=ALL, seed=0)
    assert fake_datasets == [("super_glue", "cb", "validation"), ("super_glue", "cb", "train"),
                             ("super_glue", "cb", "train")]
    assert {origin(e)[0] for e in test} == {"validation"}
    assert sorted(origin(e)[1] for e in test) == list(range(56))
    dev_size = get_task("cb").dev_size
    assert len(dev) == dev_size and len(train) == 250 - dev_size
    train_ids = {origin(e)[1] for e in train}
    dev_ids = {origin(e)[1] for e in dev}
    assert not train_ids & dev_ids and train_ids | dev_ids == set(range(250))


def test_hub_samples_are_seeded_and_clamped_to_what_the_hub_has(fake_datasets):
    first = load_examples("cb", "train", n=20, seed=3)
    assert load_examples("cb", "train", n=20, seed=3) == first
    assert load_examples("cb", "train", n=20, seed=4) != first
    assert len(load_examples("cb", "test")) == 56  # default 1000, but validation holds 56


def test_hub_rows_are_checked_like_file_rows(monkeypatch):
    module = types.ModuleType("datasets")
    module.load_dataset = lambda path, name, split: [{"sentence": "ok", "label": 7}]
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(DataError, match=r"glue/sst2 \(validation\) row 0: label 7"):
        load_examples("sst2", "test", n=ALL)


def test_a_file_never_touches_the_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    path = tmp_path / "cb.jsonl"
    path.write_text('{"premise": "p", "hypothesis": "h", "label": "neutral"}\n')
    assert load_examples("cb", "test", file=path)[0].label == 2
