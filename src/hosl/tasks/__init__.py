"""Tasks: prompt templates, verbalizers and data loaders for classification fine-tuning.

    >>> from hosl.tasks import get_task, load_examples
    >>> get_task("sst2").render({"sentence": "a gorgeous film", "label": 1})
    Example(prompt='a gorgeous film It was', candidates=(' terrible', ' great'), label=1)
    >>> train = load_examples("rt", "train", n=1000, seed=0)      # offline pack
    >>> evals = load_examples("sst2", "test", file="my_eval.jsonl")  # user's own rows

Tasks: sst2, rt (offline), rte, cb, boolq, wic, multirc, copa, wsc. Templates and verbalizers are
MeZO's (`hosl.tasks.templates`); sampling is seeded and the splits are disjoint
(`hosl.tasks.sampling`).
"""

from __future__ import annotations

from hosl.tasks.base import Example, Task
from hosl.tasks.loader import load_examples
from hosl.tasks.sampling import ALL, DEFAULT_SIZES, SPLITS
from hosl.tasks.templates import get_task, task_names

__all__ = [
    "ALL",
    "DEFAULT_SIZES",
    "SPLITS",
    "Example",
    "Task",
    "get_task",
    "load_examples",
    "task_names",
]
