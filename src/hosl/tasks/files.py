"""Local data files: JSON Lines or CSV rows with a task's official field names.

This is how users bring their own data (`--train-file/--eval-file`) and how every task runs
without the Hugging Face hub. The format follows the extension:

- ``.jsonl`` / ``.json``: one JSON object per line, e.g. ``{"sentence": "a gorgeous film",
  "label": 1}``; blank lines are skipped; extra fields (such as ``idx``) are ignored.
- ``.csv``: a header row naming the columns, then one row per record; quoted fields may span
  lines. Every value is text, so labels read as "1" or "entailment".

Every problem is a `hosl.errors.DataError` of one line that starts with ``path:line:`` (the line
where the offending record starts), so the user can open the file at the right place.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

from hosl.errors import DataError
from hosl.tasks.base import Example, Task

SUFFIXES = (".jsonl", ".json", ".csv")


def read_examples(task: Task, path: str | Path) -> list[Example]:
    """Render every row of `path` with `task`, in file order, each marked with where it came from
    (`Example.source_index`, `Example.source_line`)."""
    path = Path(path)
    examples = []
    for line, row in read_rows(path, task):
        try:
            example = task.render(row)
        except DataError as err:
            raise DataError(f"{path}:{line}: {err}") from None
        examples.append(
            dataclasses.replace(example, source_index=len(examples), source_line=line)
        )
    if not examples:
        raise DataError(f"{path}: the file has no rows; it needs {_needs(task)}")
    return examples


def read_rows(path: Path, task: Task) -> Iterator[tuple[int, dict[str, object]]]:
    """Yield (line number, row) for each record of a JSONL or CSV file."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        kind = suffix or "(none)"
        raise DataError(f"{path}: unknown data file type {kind!r}; use .jsonl or .csv")
    if not path.exists():
        raise DataError(f"{path}: no such data file; check the path given for the {task.name} data")
    if not path.is_file():
        raise DataError(f"{path}: not a file; give a .jsonl or .csv file with {_needs(task)}")
    try:
        if suffix == ".csv":
            yield from _csv_rows(path, task)
        else:
            yield from _jsonl_rows(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); save it as UTF-8") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    with open(path, encoding="utf-8-sig") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: invalid JSON ({err.msg}){_jsonl_hint(number, text)}"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{number}: expected a JSON object with field names, "
                    f"got {type(row).__name__}{_jsonl_hint(number, text)}"
                )
            yield number, row


def _jsonl_hint(number: int, text: str) -> str:
    if number == 1 and text.lstrip().startswith("["):
        return "; the file must be JSON Lines, one object per line, not one JSON array"
    return "; each line must be one JSON object"


def _csv_rows(path: Path, task: Task) -> Iterator[tuple[int, dict[str, object]]]:
    # newline="" lets the csv module see quoted line breaks; utf-8-sig drops a spreadsheet's BOM.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        header = _next_record(reader, path, 1)
        if header is None:
            raise DataError(f"{path}: the file is empty; it needs a header naming {_needs(task)}")
        header = [name.strip() for name in header]
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise DataError(f"{path}:1: the header repeats column {duplicates[0]!r}")
        missing = [name for name in task.columns if name not in header]
        if missing:
            raise DataError(
                f"{path}:1: the header has no column {missing[0]!r} "
                f"(task {task.name} reads {', '.join(task.columns)})"
            )
        while True:
            start = reader.line_num + 1
            values = _next_record(reader, path, start)
            if values is None:
                return
            if not values:
                continue  # a blank line between records
            if len(values) != len(header):
                raise DataError(
                    f"{path}:{start}: {len(values)} values but the header has "
                    f"{len(header)} columns; quote values that contain commas"
                )
            yield start, dict(zip(header, values))


def _next_record(reader, path: Path, line: int) -> list[str] | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as err:
        raise DataError(f"{path}:{line}: malformed CSV ({err})") from None


def _needs(task: Task) -> str:
    return f"the fields {', '.join(task.columns)} of task {task.name}"
