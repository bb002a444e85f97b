"""Shared fixtures: a tiny word-level tokenizer, tiny random models, a tiny sentiment task."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

# scripts/test.sh runs one pytest-xdist worker per core (up to 4): each worker computes on one
# thread, as workers × torch's default thread count would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

POSITIVE = ["good", "great", "fine", "lovely", "superb", "moving", "fresh", "bright"]
NEGATIVE = ["bad", "dull", "awful", "boring", "weak", "stale", "grim", "flat"]
NEUTRAL = ["movie", "film", "plot", "cast", "story", "the", "a", "and"]
WORDS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "It",
    "was",
    "terrible",
    "Yes",
    "No",
    "Maybe",
    *POSITIVE,
    *NEGATIVE,
    *NEUTRAL,
]


@dataclass(frozen=True)
class Ex:
    prompt: str
    candidates: tuple[str, ...]
    label: int


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # A BOS on every prompt, as OPT's and Llama's tokenizers add one.
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_llama(
    seed: int = 0, layers: int = 3, hidden: int = 32, intermediate: int = 64
) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Rows in SST-2's official format: two words decide the label, neutral words pad."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        cue = POSITIVE if label else NEGATIVE
        words = [rng.choice(cue), rng.choice(NEUTRAL), rng.choice(cue), rng.choice(NEUTRAL)]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def sentiment_examples(n: int, seed: int = 0) -> list[Ex]:
    return [
        Ex(f"{r['sentence']} It was", (" terrible", " great"), r["label"])
        for r in sentiment_rows(n, seed)
    ]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sentiment")
    paths = []
    for name, n, seed in (("train.jsonl", 64, 1), ("eval.jsonl", 32, 2)):
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n, seed)))
        paths.append(path)
    return paths[0], paths[1]


def state_leaves(tree: object, prefix: str = "") -> dict[str, object]:
    """A nested checkpoint state (dicts and lists) as {"a/b/0/": leaf}."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items()
                for k, v in state_leaves(value, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return state_leaves(dict(enumerate(tree)), prefix)
    return {prefix: tree}


def assert_same_state(a: dict, b: dict) -> None:
    """Two nested states hold the same keys, tensors equal bit for bit, other leaves equal."""
    flat_a, flat_b = state_leaves(a), state_leaves(b)
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, flat_b[key]), key
        else:
            assert value == flat_b[key], key
