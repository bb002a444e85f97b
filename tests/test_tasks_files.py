"""Local JSONL/CSV files: reading, sampling, and one-line errors that name the file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hosl.errors import ConfigError, DataError
from hosl.tasks import ALL, load_examples

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def data_error(path: Path, task: str = "sst2", **kwargs) -> str:
    with pytest.raises(DataError) as err:
        load_examples(task, "train", file=path, **kwargs)
    message = str(err.value)
    assert "\n" not in message, "user-facing errors are one line"
    return message


def test_csv_and_jsonl_with_the_same_rows_render_the_same():
    from_csv = load_examples("rte", "dev", file=FIXTURES / "rte.csv")
    from_jsonl = load_examples("rte", "dev", file=str(FIXTURES / "rte.jsonl"))
    assert from_csv == from_jsonl
    assert len(from_csv) == 3


def test_csv_quoted_fields_may_span_lines_and_errors_point_at_the_record_start(tmp_path):
    path = write(
        tmp_path / "multi.csv",
        'label,sentence\n1,"first line\nsecond line"\n\n0,fine\n2,"a review\nover two lines"\n',
    )
    message = data_error(path)
    assert message.startswith(f"{path}:6: label '2'")


def test_bad_json_names_file_and_line(tmp_path):
    path = write(
        tmp_path / "bad.jsonl",
        '{"sentence": "ok", "label": 1}\n\n{"sentence": "broken", "label": 1\n',
    )
    assert re.match(rf"{re.escape(str(path))}:3: invalid JSON", data_error(path))


def test_missing_field_names_file_line_and_the_fields_needed(tmp_path):
    rows = [{"sentence": "ok", "label": 0}, {"text": "x", "label": 1}]
    path = jsonl(tmp_path / "rows.jsonl", rows)
    message = data_error(path)
    assert message.startswith(f"{path}:2: row has no field 'sentence'")
    assert "sentence, label" in message


def test_label_outside_the_task_names_file_and_line(tmp_path):
    rows = [{"premise": "p", "hypothesis": "h", "label": lab} for lab in (0, 1, "neutral")]
    path = jsonl(tmp_path / "rte.jsonl", rows)
    message = data_error(path, task="rte")
    assert message.startswith(f"{path}:3: label 'neutral' is not a label of task rte")
    assert "entailment, not_entailment" in message


def test_json_array_and_non_object_lines_are_explained(tmp_path):
    array = write(tmp_path / "array.json", '[{"sentence": "a", "label": 1}]\n')
    assert "JSON Lines" in data_error(array)
    scalar = write(tmp_path / "scalar.jsonl", '{"sentence": "a", "label": 1}\n"just text"\n')
    assert data_error(scalar).startswith(f"{scalar}:2: expected a JSON object")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv"])
def test_empty_files_are_an_error_naming_the_file(tmp_path, name):
    path = write(tmp_path / name, "\n" if name.endswith("jsonl") else "")
    message = data_error(path)
    assert message.startswith(f"{path}: the file")
    assert "sentence, label" in message


def test_csv_with_only_a_header_has_no_rows(tmp_path):
    path = write(tmp_path / "header.csv", "sentence,label\n")
    assert "no rows" in data_error(path)


def test_csv_header_missing_a_column_is_line_one(tmp_path):
    path = write(tmp_path / "rte.csv", "premise,label\np,0\n")
    message = data_error(path, task="rte")
    assert message.startswith(f"{path}:1: the header has no column 'hypothesis'")


def test_csv_row_with_too_many_values_names_its_line(tmp_path):
    path = write(tmp_path / "rows.csv", "sentence,label\ngood,1\nbad, really bad,0\n")
    assert data_error(path).startswith(f"{path}:3: 3 values but the header has 2 columns")


def test_csv_repeated_header_column_is_an_error(tmp_path):
    path = write(tmp_path / "rows.csv", "sentence,label,label\na,1,1\n")
    assert data_error(path).startswith(f"{path}:1: the header repeats column 'label'")


def test_missing_file_directory_and_unknown_extension(tmp_path):
    assert "no such data file" in data_error(tmp_path / "absent.jsonl")
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    assert "not a file" in data_error(folder)
    assert "use .jsonl or .csv" in data_error(write(tmp_path / "rows.tsv", "sentence\tlabel\n"))


def test_non_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"sentence": "caf\u00e9", "label": 1}\n'.encode("latin-1"))
    assert "not UTF-8" in data_error(path)


def test_file_sample_is_seeded_a_subset_and_all_rows_without_n(tmp_path):
    rows = [{"sentence": f"review number {i}", "label": i % 2} for i in range(40)]
    path = jsonl(tmp_path / "many.jsonl", rows)
    everything = load_examples("sst2", "train", file=path)
    assert [e.prompt for e in everything] == [f"review number {i} It was" for i in range(40)]
    assert load_examples("sst2", "train", file=path, n=ALL) == everything
    first = load_examples("sst2", "train", file=path, n=10, seed=3)
    assert first == load_examples("sst2", "train", file=path, n=10, seed=3)
    assert len(first) == len({e.prompt for e in first}) == 10
    assert set(first) <= set(everything)
    assert first != load_examples("sst2", "train", file=path, n=10, seed=4)
    assert load_examples("sst2", "train", file=path, n=20, seed=3)[:10] == first


def test_asking_a_file_for_more_rows_than_it_has_returns_them_all(tmp_path, caplog):
    path = FIXTURES / "sst2.jsonl"
    examples = load_examples("sst2", "test", file=path, n=50)
    assert sorted(e.prompt for e in examples) == sorted(
        e.prompt for e in load_examples("sst2", "test", file=path)
    )
    assert "asked for 50" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n": -2}, "sample size"), ({"n": 1.5}, "sample size"), ({"seed": -1}, "seed"),
     ({"seed": 2**32}, "seed")],
)
def test_bad_sizes_and_seeds_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_examples("sst2", "train", file=FIXTURES / "sst2.jsonl", **kwargs)


def test_unknown_split_is_a_config_error():
    with pytest.raises(ConfigError, match="train, dev, test"):
        load_examples("sst2", "validation", file=FIXTURES / "sst2.jsonl")
