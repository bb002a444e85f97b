"""Task data from the Hugging Face hub, through the optional `datasets` package.

Users who can reach the hub get MeZO's data: GLUE's SST-2 and the SuperGLUE tasks. The hub's test
splits carry no labels, so, as in MeZO, hosl's `test` is a seeded sample of the hub's
`validation` split, while `train` and `dev` are disjoint blocks of one seeded permutation of the
hub's `train` split (see `hosl.tasks.sampling`).

`datasets` is imported only here and only when a hub task is loaded, so the rest of hosl works
without it. When it is missing, or the hub cannot be reached, the user gets one line that names
the offline ways to train: local files (`--train-file/--eval-file`) and the `rt` pack.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import MappingProxyType

from hosl.errors import DataError
from hosl.tasks.base import Example, Task
from hosl.tasks.sampling import block, permutation, take

HUB_SPLITS = MappingProxyType({"train": "train", "dev": "train", "test": "validation"})
"""hosl's split -> the hub split it is drawn from."""

OFFLINE_HINT = (
    "offline, pass your own JSONL/CSV files with --train-file/--eval-file, "
    "or use task 'rt' (Rotten Tomatoes, shipped as an offline pack)"
)


def load_split(task: Task, split: str, n: int | None, seed: int) -> list[Example]:
    """Seeded sample of `split` for a hub task; see the module docstring for where it comes from."""
    rows = hub_rows(task, HUB_SPLITS[split])
    if split == "test":
        indices = permutation(len(rows), seed)
    else:
        indices = block(len(rows), seed, split, reserved=[("dev", task.dev_size)])
    path, config = _hub_name(task)
    chosen = take(indices, n, split, f"{path}/{config}")
    return [_render(task, rows[i], i, HUB_SPLITS[split]) for i in chosen]


def hub_rows(task: Task, hub_split: str) -> Sequence[dict[str, object]]:
    """All rows of one split of the task's hub data set, as an indexable sequence of dicts."""
    path, config = _hub_name(task)
    where = f"{path}/{config} ({hub_split})"
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise DataError(
            f"task {task.name} reads {where} from the Hugging Face hub, which needs the optional "
            f"'datasets' package (pip install 'hosl[datasets]'); {OFFLINE_HINT}"
        ) from None
    try:
        return datasets.load_dataset(path, config, split=hub_split)
    except Exception as err:  # the hub raises many types (HTTP, connection, offline mode, ...)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"could not load {where} from the Hugging Face hub ({reason}); {OFFLINE_HINT}"
        ) from err


def _hub_name(task: Task) -> tuple[str, str]:
    if task.hub is None:
        raise DataError(f"task {task.name} has no Hugging Face hub data; {OFFLINE_HINT}")
    return task.hub


def _render(task: Task, row: dict[str, object], index: int, hub_split: str) -> Example:
    try:
        return task.render(row)
    except DataError as err:
        path, config = _hub_name(task)
        raise DataError(f"{path}/{config} ({hub_split}) row {index}: {err}") from None
