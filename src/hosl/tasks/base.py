"""Examples and tasks: what a task turns one data row into.

An `Example` is all the trainer needs to score one row as classification (MeZO's "train as
classification"): the prompt, the candidate continuations, and the index of the right one. The text
the model reads for candidate i is exactly ``prompt + candidates[i]``. Any space between the two
belongs to the candidate (" great"), never to the prompt, so that a tokenizer puts it inside the
candidate's first token as it would in running text. Prompts that end in a newline take candidates
without a leading space ("Yes"), as MeZO's templates do.

A `Task` names the fields a row must hold (the official field names of the data set), its label
names, its template and its verbalizer. `Task.render` checks the row and raises
`hosl.errors.DataError` with a one-line reason; the file readers prefix that reason with the file
name and line number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Integral

from hosl.errors import DataError

Row = Mapping[str, str]
"""The text fields of one row, already checked: every field the task names, as a non-empty str."""


@dataclass(frozen=True)
class Example:
    """One rendered row: score ``prompt + c`` for each candidate c; `label` indexes the answer."""

    prompt: str
    candidates: tuple[str, ...]
    label: int
    # Where a user's file holds the row: its 0-based record number (header and blank lines not
    # counted) and the 1-based line it starts on. None for built-in data.
    source_index: int | None = field(default=None, compare=False, repr=False)
    source_line: int | None = field(default=None, compare=False, repr=False)
    # The row's task columns as read (text fields, then the label id): what a data file of this
    # example holds, so a subset of examples can be written back out (`hosl.federated.partition`).
    row: Mapping[str, object] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.label < len(self.candidates):
            raise ValueError(f"label {self.label} does not index {len(self.candidates)} candidates")


@dataclass(frozen=True)
class Task:
    """A classification task: which fields a row holds, its labels, and how it reads as a prompt.

    `labels` are the official label names; a label's position is its id, and the verbalizer returns
    one candidate per label id in the same order. `hub` is the (path, config) of the task on the
    Hugging Face hub; `None` marks a task served from an offline pack. `dev_size` is how many
    examples of the hub's train split are held back as the dev split (see `hosl.tasks.sampling`).
    """

    name: str
    fields: tuple[str, ...]
    labels: tuple[str, ...]
    template: Callable[[Row], str] = field(repr=False, compare=False)
    verbalizer: Callable[[Row], tuple[str, ...]] = field(repr=False, compare=False)
    hub: tuple[str, str] | None = None
    dev_size: int = 500
    summary: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        """Every field a data file must provide: the text fields, then `label`."""
        return (*self.fields, "label")

    def render(self, row: Mapping[str, object]) -> Example:
        """Turn one row (official field names; extra fields are ignored) into an `Example`."""
        text = {name: self._text(row, name) for name in self.fields}
        if "label" not in row:
            raise DataError(self._missing("label"))
        label = parse_label(row["label"], self)
        return Example(
            self.template(text), self.verbalizer(text), label, row={**text, "label": label}
        )

    def _text(self, row: Mapping[str, object], name: str) -> str:
        if name not in row or row[name] is None:
            raise DataError(self._missing(name))
        value = row[name]
        if not isinstance(value, str):
            raise DataError(f"field '{name}' must be text, not {type(value).__name__} {value!r}")
        if not value.strip():
            raise DataError(f"field '{name}' is empty")
        return value

    def _missing(self, name: str) -> str:
        return f"row has no field '{name}' (task {self.name} reads {', '.join(self.columns)})"


def parse_label(value: object, task: Task) -> int:
    """The label id of `value`: an int id, its decimal string, or an official label name.

    Names match case-insensitively ("entailment", "True", "true"). JSON booleans are accepted only
    for tasks whose labels are False/True (BoolQ, WiC, WSC, MultiRC), where they are the official
    encoding. Anything else — floats, other strings, ids out of range — is an error, because a
    silently wrong label corrupts training without any visible symptom.
    """
    names = task.labels
    if isinstance(value, bool):
        if names == ("False", "True"):
            return int(value)
    elif isinstance(value, Integral):  # numpy integers from data frames count too
        if 0 <= value < len(names):
            return int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and int(text) < len(names):
            return int(text)
        for index, name in enumerate(names):
            if text.lower() == name.lower():
                return index
    allowed = ", ".join(str(i) for i in range(len(names)))
    raise DataError(
        f"label {value!r} is not a label of task {task.name} "
        f"(use {allowed} or {', '.join(names)}, in that order)"
    )
