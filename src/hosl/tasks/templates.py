r"""Every task hosl knows: its fields, labels, prompt template and verbalizer.

The wordings are MeZO's (Malladi et al., 2023, large_models/templates.py; most come from
PromptSource), so that accuracies can be compared with the MeZO and HOSL papers. Rendered with the
row {"premise": "P", "hypothesis": "H", ...} they read, exactly:

    sst2, rt  "{sentence} It was"
              -> " terrible", " great"
    rte       "P\nDoes this mean that \"H\" is true? Yes or No?\n"
              -> "Yes", "No"
    cb        "Suppose P Can we infer that \"H\"? Yes, No, or Maybe?\n"
              -> "Yes", "No", "Maybe"
    boolq     "{passage} {Question}?\n"
              -> "No", "Yes"
    wic       "Does the word \"{word}\" have the same meaning in these two sentences? Yes, No?\n"
              "{sentence1}\n{sentence2}\n"
              -> "No", "Yes"
    multirc   "{paragraph}\nQuestion: {question}\n"
              "I found this answer \"{answer}\". Is that correct? Yes or No?\n"
              -> "No", "Yes"
    wsc       "{text}\nIn the previous sentence, does the pronoun \"{span2_text}\" refer to "
              "{span1_text}? Yes or No?\n"
              -> "No", "Yes"
    copa      "{premise without its final period} so" (effect), "... because" (cause)
              -> " {choice1}", " {choice2}", each with its first word lower-cased

Candidates are listed in label-id order: SuperGLUE's RTE and CB put entailment first (id 0), so
"Yes" comes first there, while the False/True tasks (BoolQ, WiC, WSC, MultiRC) read "No" for 0.
Spacing follows `hosl.tasks.base`: candidates after a newline carry no leading space; the SST-2
verbalizer and COPA's choices carry one. Details kept from MeZO: the SST-2 sentence is stripped
(GLUE's sentences end in a space); BoolQ's question gets a capital first letter and a "?" only if it
lacks one; WSC's pronoun is lower-cased. COPA lower-cases the first word of each choice as MeZO
does, except the pronoun "I" (and "I'm", "I'd"...) and words with further capitals such as "TV" or
"McDonald's", which MeZO would mangle into "tv" and "mcdonald's".
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from hosl.errors import ConfigError, DataError
from hosl.tasks.base import Row, Task

SENTIMENT = (" terrible", " great")
YES_NO = ("Yes", "No")
NO_YES = ("No", "Yes")
YES_NO_MAYBE = ("Yes", "No", "Maybe")
FALSE_TRUE = ("False", "True")


def _sentiment(row: Row) -> str:
    return f"{row['sentence'].strip()} It was"


def _rte(row: Row) -> str:
    return f"{row['premise']}\nDoes this mean that \"{row['hypothesis']}\" is true? Yes or No?\n"


def _cb(row: Row) -> str:
    return (
        f"Suppose {row['premise']} Can we infer that \"{row['hypothesis']}\"? Yes, No, or Maybe?\n"
    )


def _boolq(row: Row) -> str:
    question = row["question"].strip()
    if not question.endswith("?"):
        question += "?"
    return f"{row['passage']} {question[0].upper()}{question[1:]}\n"


def _wic(row: Row) -> str:
    return (
        f"Does the word \"{row['word']}\" have the same meaning in these two sentences? Yes, No?\n"
        f"{row['sentence1']}\n{row['sentence2']}\n"
    )


def _multirc(row: Row) -> str:
    return (
        f"{row['paragraph']}\nQuestion: {row['question']}\n"
        f"I found this answer \"{row['answer']}\". Is that correct? Yes or No?\n"
    )


def _wsc(row: Row) -> str:
    return (
        f"{row['text']}\nIn the previous sentence, does the pronoun \"{row['span2_text'].lower()}\""
        f" refer to {row['span1_text']}? Yes or No?\n"
    )


_COPA_CONJUNCTIONS = MappingProxyType({"effect": " so", "cause": " because"})


def _copa(row: Row) -> str:
    question = row["question"].strip()
    if question not in _COPA_CONJUNCTIONS:
        raise DataError(f"field 'question' is {question!r}; COPA expects 'cause' or 'effect'")
    premise = row["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    return premise + _COPA_CONJUNCTIONS[question]


def lower_first_word(choice: str) -> str:
    """COPA's choice as it reads after "so"/"because": "The sun rose." -> "the sun rose."."""
    word = choice.split(" ", 1)[0]
    keeps_capital = (
        word == "I" or word.startswith(("I'", "I\u2019")) or word[1:] != word[1:].lower()
    )
    return choice if keeps_capital else choice[:1].lower() + choice[1:]


def _copa_choices(row: Row) -> tuple[str, ...]:
    return tuple(" " + lower_first_word(row[name].strip()) for name in ("choice1", "choice2"))


def _fixed(words: tuple[str, ...]) -> Callable[[Row], tuple[str, ...]]:
    """A verbalizer whose candidates do not depend on the row."""

    def verbalizer(row: Row) -> tuple[str, ...]:
        return words

    return verbalizer


def _super_glue(config: str) -> tuple[str, str]:
    return ("super_glue", config)


# The small SuperGLUE train splits (CB 250, COPA 400, WSC 554 rows) hold back 100 rows for dev
# rather than 500, so that most of their data is still there to train on.
_TASKS = (
    Task("sst2", ("sentence",), ("negative", "positive"), _sentiment, _fixed(SENTIMENT),
         hub=("glue", "sst2"), summary="SST-2 movie-review sentiment (GLUE)"),
    Task("rt", ("sentence",), ("negative", "positive"), _sentiment, _fixed(SENTIMENT),
         hub=None, summary="Rotten Tomatoes review snippets, offline pack; SST-2's template"),
    Task("rte", ("premise", "hypothesis"), ("entailment", "not_entailment"), _rte,
         _fixed(YES_NO), hub=_super_glue("rte"), summary="textual entailment (SuperGLUE RTE)"),
    Task("cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"), _cb,
         _fixed(YES_NO_MAYBE), hub=_super_glue("cb"), dev_size=100,
         summary="three-way entailment (SuperGLUE CommitmentBank)"),
    Task("boolq", ("passage", "question"), FALSE_TRUE, _boolq, _fixed(NO_YES),
         hub=_super_glue("boolq"), summary="yes/no questions about a passage (SuperGLUE BoolQ)"),
    Task("wic", ("word", "sentence1", "sentence2"), FALSE_TRUE, _wic, _fixed(NO_YES),
         hub=_super_glue("wic"), summary="word sense in two contexts (SuperGLUE WiC)"),
    Task("multirc", ("paragraph", "question", "answer"), FALSE_TRUE, _multirc, _fixed(NO_YES),
         hub=_super_glue("multirc"), summary="is this answer correct? (SuperGLUE MultiRC)"),
    Task("copa", ("premise", "choice1", "choice2", "question"), ("choice1", "choice2"), _copa,
         _copa_choices, hub=_super_glue("copa"), dev_size=100,
         summary="cause or effect, two choices scored by log-probability (SuperGLUE COPA)"),
    Task("wsc", ("text", "span1_text", "span2_text"), FALSE_TRUE, _wsc, _fixed(NO_YES),
         hub=_super_glue("wsc.fixed"), dev_size=100,
         summary="pronoun resolution (SuperGLUE WSC, fixed spans)"),
)

TASKS = MappingProxyType({task.name: task for task in _TASKS})
"""Task name -> Task, read-only."""


def task_names() -> list[str]:
    """The names `get_task` accepts, in a stable order (sentiment first, then SuperGLUE)."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task called `name` (case-insensitive); `ConfigError` naming the choices otherwise."""
    task = TASKS.get(name.strip().lower()) if isinstance(name, str) else None
    if task is None:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(task_names())}")
    return task
