"""Seeded sampling: deterministic, disjoint splits, independent of the order of calls."""

from __future__ import annotations

import pytest

from hosl.errors import DataError
from hosl.tasks import ALL, DEFAULT_SIZES, load_examples
from hosl.tasks import rotten_tomatoes as rt_pack
from hosl.tasks.sampling import block, permutation, take

POOL = 3000


@pytest.fixture
def synthetic_pack(monkeypatch, tmp_path):
    """Task `rt` over 3000 numbered reviews, so split arithmetic can be checked exactly."""
    rows = [{"sentence": f"review {i}", "label": i % 2} for i in range(POOL)]
    reads = []

    def read_reviews(path):
        reads.append(path)
        return rows

    monkeypatch.setattr(rt_pack, "pack_file", lambda: tmp_path / "pack.csv.bz2")
    monkeypatch.setattr(rt_pack, "read_reviews", read_reviews)
    return reads


def ids(examples) -> list[int]:
    return [int(e.prompt.split()[1]) for e in examples]


def test_default_sizes_are_mezos(synthetic_pack):
    for split, size in DEFAULT_SIZES.items():
        assert len(load_examples("rt", split)) == size
    assert dict(DEFAULT_SIZES) == {"train": 1000, "dev": 500, "test": 1000}


@pytest.mark.parametrize("seed", [0, 7])
def test_whole_splits_partition_the_pool(synthetic_pack, seed):
    splits = {s: ids(load_examples("rt", s, n=ALL, seed=seed)) for s in ("train", "dev", "test")}
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [POOL - 1500, 500, 1000]
    everything = splits["train"] + splits["dev"] + splits["test"]
    assert sorted(everything) == list(range(POOL))


def test_same_seed_same_sample_and_order_of_calls_does_not_matter(synthetic_pack):
    forward = [ids(load_examples("rt", s, n=100, seed=5)) for s in ("train", "dev", "test")]
    backward = [ids(load_examples("rt", s, n=100, seed=5)) for s in ("test", "dev", "train")]
    assert forward == backward[::-1]
    other_seed = [ids(load_examples("rt", s, n=100, seed=6)) for s in ("train", "dev", "test")]
    assert all(a != b for a, b in zip(forward, other_seed))


def test_a_split_does_not_depend_on_how_much_another_split_asked_for(synthetic_pack):
    dev = ids(load_examples("rt", "dev", n=500, seed=1))
    load_examples("rt", "train", n=ALL, seed=1)
    assert ids(load_examples("rt", "dev", n=500, seed=1)) == dev
    train_small = ids(load_examples("rt", "train", n=10, seed=1))
    train_big = ids(load_examples("rt", "train", n=1400, seed=1))
    assert train_big[:10] == train_small
    assert not set(train_big) & set(dev)


def test_samples_are_shuffled_not_the_pool_order(synthetic_pack):
    train = ids(load_examples("rt", "train", n=100, seed=0))
    assert train != sorted(train)


def test_more_than_a_block_holds_returns_the_block_and_warns(synthetic_pack, caplog):
    assert len(load_examples("rt", "dev", n=800)) == 500
    assert "asked for 800 dev examples" in caplog.text


def test_n_zero_is_an_empty_sample(synthetic_pack):
    assert load_examples("rt", "train", n=0) == []


def test_block_layout_train_head_reserved_tail():
    order = permutation(20, seed=3)
    reserved = [("test", 4), ("dev", 3)]
    assert block(20, 3, "test", reserved) == order[16:]
    assert block(20, 3, "dev", reserved) == order[13:16]
    assert block(20, 3, "train", reserved) == order[:13]


def test_permutation_is_a_pure_function_of_size_and_seed():
    first = permutation(50, 11)
    assert sorted(first) == list(range(50))
    assert permutation(50, 11) == first
    assert permutation(50, 12) != first


def test_pool_too_small_for_the_reserved_blocks_is_a_data_error():
    with pytest.raises(DataError, match="pool of 10 rows"):
        block(10, 0, "train", [("dev", 10)])


def test_take_defaults_to_the_split_size():
    items = list(range(5000))
    assert take(items, None, "dev", "x") == items[:500]
    assert take(items, ALL, "dev", "x") == items
    assert take(items[:30], None, "test", "x") == items[:30]
