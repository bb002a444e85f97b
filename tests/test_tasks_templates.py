"""Exact rendered prompts, candidates and label order for every task (MeZO's wordings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hosl.errors import ConfigError, DataError
from hosl.tasks import Example, get_task, load_examples, task_names
from hosl.tasks.base import parse_label
from hosl.tasks.templates import lower_first_word

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"

# (prompt, candidates, label) for each fixture row, written out by hand.
EXPECTED = {
    "sst2": [
        ("a gorgeous , witty , seductive movie . It was", (" terrible", " great"), 1),
        ("the plot is nothing but boilerplate cliches It was", (" terrible", " great"), 0),
        ("an ambitious , if flawed , effort It was", (" terrible", " great"), 1),
    ],
    "rte": [
        (
            "The museum opened in 1921, and it has never closed since.\n"
            'Does this mean that "The museum opened in 1921." is true? Yes or No?\n',
            ("Yes", "No"),
            0,
        ),
        (
            "Ann sold her bicycle to a neighbour.\n"
            'Does this mean that "Ann bought a bicycle." is true? Yes or No?\n',
            ("Yes", "No"),
            1,
        ),
        (
            'The "Blue Line" train runs every ten minutes.\n'
            'Does this mean that "Trains on the Blue Line are frequent." is true? Yes or No?\n',
            ("Yes", "No"),
            0,
        ),
    ],
    "cb": [
        (
            "Suppose B: I think the weather will hold. A: Do you really think so? "
            'Can we infer that "the weather will hold"? Yes, No, or Maybe?\n',
            ("Yes", "No", "Maybe"),
            2,
        ),
        (
            "Suppose She said the door was locked, and it was. "
            'Can we infer that "the door was locked"? Yes, No, or Maybe?\n',
            ("Yes", "No", "Maybe"),
            0,
        ),
        (
            "Suppose He never doubted that the bridge had collapsed, though it stood firm. "
            'Can we infer that "the bridge had collapsed"? Yes, No, or Maybe?\n',
            ("Yes", "No", "Maybe"),
            1,
        ),
    ],
    "boolq": [
        (
            "The river runs for 300 km, while the canal is only 40 km long. "
            "Is the river longer than the canal?\n",
            ("No", "Yes"),
            1,
        ),
        (
            "Penguins are flightless birds that swim with their wings. Can penguins fly?\n",
            ("No", "Yes"),
            0,
        ),
        (
            "The shop opens every day except Sunday. Does the shop open on sundays?\n",
            ("No", "Yes"),
            0,
        ),
    ],
    "wic": [
        (
            'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
            "She sat on the bank of the river.\nHe deposited the cheque at the bank.\n",
            ("No", "Yes"),
            0,
        ),
        (
            'Does the word "run" have the same meaning in these two sentences? Yes, No?\n'
            "I run every morning.\nThey run to the station.\n",
            ("No", "Yes"),
            1,
        ),
    ],
    "multirc": [
        (
            "Tom planted three trees in spring. By autumn, two of them bore apples.\n"
            "Question: How many trees bore apples?\n"
            'I found this answer "Two". Is that correct? Yes or No?\n',
            ("No", "Yes"),
            1,
        ),
        (
            "Tom planted three trees in spring. By autumn, two of them bore apples.\n"
            "Question: How many trees bore apples?\n"
            'I found this answer "Three". Is that correct? Yes or No?\n',
            ("No", "Yes"),
            0,
        ),
    ],
    "copa": [
        (
            "The man broke his toe because",
            (" he dropped a hammer on his foot.", " he got a hole in his sock."),
            0,
        ),
        (
            "I tipped the bottle so",
            (" the liquid in the bottle froze.", " the liquid in the bottle poured out."),
            1,
        ),
        ("The power went out so", (" I lit a candle.", " TV sets stayed on."), 0),
    ],
    "wsc": [
        (
            "Mark told Pete many lies about himself, which Pete included in his book. "
            "He should have been more truthful.\n"
            'In the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n',
            ("No", "Yes"),
            1,
        ),
        (
            "The trophy doesn't fit into the brown suitcase because it is too small.\n"
            'In the previous sentence, does the pronoun "it" refer to the trophy? Yes or No?\n',
            ("No", "Yes"),
            0,
        ),
    ],
}


def test_every_task_has_a_fixture_and_expectations():
    assert set(task_names()) == set(EXPECTED) | {"rt"}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_rendered_fixture_rows_are_exact(task):
    examples = load_examples(task, "train", file=FIXTURES / f"{task}.jsonl")
    assert [(e.prompt, e.candidates, e.label) for e in examples] == EXPECTED[task]


def test_rt_renders_like_sst2():
    rt = load_examples("rt", "train", file=FIXTURES / "sst2.jsonl")
    sst2 = load_examples("sst2", "train", file=FIXTURES / "sst2.jsonl")
    assert rt == sst2


@pytest.mark.parametrize(
    ("task", "label", "answer"),
    [
        ("sst2", "negative", " terrible"),
        ("sst2", "positive", " great"),
        ("rte", "entailment", "Yes"),
        ("rte", "not_entailment", "No"),
        ("cb", "entailment", "Yes"),
        ("cb", "contradiction", "No"),
        ("cb", "neutral", "Maybe"),
        ("boolq", True, "Yes"),
        ("boolq", False, "No"),
        ("wic", "True", "Yes"),
        ("multirc", 0, "No"),
        ("wsc", "true", "Yes"),
    ],
)
def test_official_label_names_pick_the_right_verbalizer_word(task, label, answer):
    spec = get_task(task)
    row = {name: "x" for name in spec.fields} | {"label": label}
    example = spec.render(row)
    assert example.candidates[example.label] == answer


def test_copa_label_picks_the_choice_it_names():
    row = {"premise": "It rained.", "choice1": "A", "choice2": "B", "question": "effect"}
    assert get_task("copa").render(row | {"label": "choice2"}).label == 1
    assert get_task("copa").render(row | {"label": 0}).candidates == (" a", " b")


@pytest.mark.parametrize(
    ("task", "label"),
    [("sst2", True), ("sst2", 2), ("sst2", -1), ("sst2", "1.0"), ("sst2", 1.0), ("rte", "yes"),
     ("cb", 3), ("boolq", "maybe"), ("wic", None), ("copa", "choice3")],
)
def test_labels_outside_the_task_are_rejected(task, label):
    spec = get_task(task)
    with pytest.raises(DataError, match=f"task {task}") as err:
        parse_label(label, spec)
    assert "\n" not in str(err.value)


def test_decimal_strings_numpy_ints_and_case_insensitive_names_are_labels():
    assert parse_label(" 1 ", get_task("sst2")) == 1
    assert parse_label(np.int64(1), get_task("sst2")) == 1
    assert parse_label("NEUTRAL", get_task("cb")) == 2
    assert parse_label("true", get_task("boolq")) == 1


def test_render_names_the_missing_field_and_the_fields_the_task_reads():
    with pytest.raises(DataError, match="no field 'hypothesis'.*premise, hypothesis, label"):
        get_task("rte").render({"premise": "p", "label": 0})
    with pytest.raises(DataError, match="no field 'label'"):
        get_task("sst2").render({"sentence": "s"})


def test_render_rejects_empty_and_non_text_fields():
    with pytest.raises(DataError, match="'sentence' is empty"):
        get_task("sst2").render({"sentence": "  ", "label": 0})
    with pytest.raises(DataError, match="'sentence' must be text"):
        get_task("sst2").render({"sentence": 5, "label": 0})


def test_copa_rejects_a_question_other_than_cause_or_effect():
    row = {"premise": "p.", "choice1": "a", "choice2": "b", "question": "reason", "label": 0}
    with pytest.raises(DataError, match="'cause' or 'effect'"):
        get_task("copa").render(row)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("The sun rose.", "the sun rose."), ("A dog barked.", "a dog barked."),
     ("I left.", "I left."), ("I'm tired.", "I'm tired."), ("TV sets broke.", "TV sets broke."),
     ("McDonald's closed.", "McDonald's closed."), ("she ran.", "she ran.")],
)
def test_copa_lower_cases_the_first_word_except_pronoun_i_and_acronyms(choice, expected):
    assert lower_first_word(choice) == expected


def test_boolq_keeps_an_existing_question_mark():
    row = {"passage": "P.", "question": "is it?", "label": 1}
    assert get_task("boolq").render(row).prompt == "P. Is it?\n"


def test_get_task_is_case_insensitive_and_unknown_names_list_the_choices():
    assert get_task(" SST2 ").name == "sst2"
    with pytest.raises(ConfigError) as err:
        get_task("sst5")
    assert all(name in str(err.value) for name in task_names())


def test_example_label_must_index_a_candidate():
    with pytest.raises(ValueError):
        Example("p", ("a", "b"), 2)


def test_tasks_declare_label_names_matching_their_candidate_count():
    for name in task_names():
        spec = get_task(name)
        row = {field: "x." for field in spec.fields} | {"label": 0, "question": "cause"}
        assert len(spec.render(row).candidates) == len(spec.labels)
