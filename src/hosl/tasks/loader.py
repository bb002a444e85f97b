"""`load_examples`: one call that turns (task, split) into rendered examples from any source.

Sources, in the order they are tried:

1. ``file=...``: a local JSONL or CSV file with the task's official field names
   (`hosl.tasks.files`). Every row is rendered; with `n`, a seeded sample of n rows is kept,
   otherwise all rows in file order. The split name only says what the file is for.
2. task ``rt``: the offline Rotten Tomatoes pack (`hosl.tasks.rotten_tomatoes`).
3. any other task: its Hugging Face hub data set via the optional `datasets` package
   (`hosl.tasks.hub`).

For the built-in sources `n=None` means the split's default size (1000 train, 500 dev, 1000 test),
`n=ALL` (-1) the whole split. Results are a pure function of (task, split, file contents, n, seed).
"""

from __future__ import annotations

from pathlib import Path

from hosl.tasks import hub, rotten_tomatoes
from hosl.tasks.base import Example
from hosl.tasks.files import read_examples
from hosl.tasks.sampling import check_request, sample_file
from hosl.tasks.templates import get_task


def load_examples(
    task: str,
    split: str,
    *,
    file: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Rendered examples of `task`'s `split` ("train", "dev" or "test"); see the module docstring.

    Raises `hosl.errors.ConfigError` for an unknown task, split, size or seed, and
    `hosl.errors.DataError` for data that cannot be read (with file and line where there is one).
    """
    spec = get_task(task)
    check_request(split, n, seed)
    if file is not None:
        return sample_file(read_examples(spec, file), n, seed)
    if spec.hub is None:
        return rotten_tomatoes.load_split(spec, split, n, seed)
    return hub.load_split(spec, split, n, seed)
