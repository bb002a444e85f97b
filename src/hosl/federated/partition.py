"""Seeded partitions of a training set across N clients: `iid` or `dirichlet:ALPHA` over labels.

A partition is N disjoint lists of indices into the training set that together cover it. Each
list is in ascending order, so a client's data keeps the training set's own order (one client
under `iid` holds exactly the training set, in order: a one-client run is the plain run).

- `iid`: one seeded permutation cut into N blocks whose sizes differ by at most one.
- `dirichlet:ALPHA` (the label-skew partition of Hsu et al., 2019): for each label y, a seeded
  draw p_y ~ Dir(ALPHA · 1_N) says which share of y's examples each client gets. A small ALPHA
  gives most of a label to a few clients (strong skew); a large ALPHA approaches `iid`. A draw
  that leaves some client with no example is redrawn (a client with no data cannot take a step).

`label_skew` measures the result: the mean over clients of the total-variation distance between
a client's label histogram and the whole set's (0 for identical mixes, 1 for disjoint labels).

`write_partition` puts one data file per client in the run directory, in the JSON Lines format
`--train-file` reads (the task's official fields), plus `partition.json` (sizes, label counts
and the training-set indices of each client) so a client can be started on its own file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hosl.errors import ConfigError, DataError
from hosl.tasks.base import Example
from hosl.zo.seeds import tensor_seed

# A Dirichlet draw that leaves a client empty is redrawn at most this many times. Strong skew over
# many clients rarely leaves every client something: 1000 examples of two labels over 16 clients
# at ALPHA 0.1 succeed in 0.28% of draws (the first success came at draw 84 for seed 0, 104 for
# seed 1), so a cap of 100 refused half the seeds; 10,000 fails such a case with probability
# e^-28 and costs under a second when nothing fits. Taking the first success samples the
# Dirichlet partition conditioned on no client being empty, and a cap raised later changes no
# partition drawn before (the draws are the same stream).
DIRICHLET_TRIES = 10_000
CLIENT_DIR = "clients"


@dataclass(frozen=True)
class PartitionSpec:
    kind: str  # "iid" or "dirichlet"
    alpha: float | None = None  # the Dirichlet concentration

    def __str__(self) -> str:
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"


def parse_partition(text: str) -> PartitionSpec:
    """`iid` or `dirichlet:ALPHA` (ALPHA > 0), or a one-line ConfigError."""
    kind, _, value = text.strip().partition(":")
    if kind == "iid" and not value:
        return PartitionSpec("iid")
    if kind == "dirichlet":
        try:
            alpha = float(value)
        except ValueError:
            alpha = float("nan")
        if alpha > 0 and np.isfinite(alpha):
            return PartitionSpec("dirichlet", alpha)
    raise ConfigError(
        f"clients.partition {text!r}: use iid or dirichlet:ALPHA with ALPHA > 0 "
        "(e.g. dirichlet:0.5; smaller ALPHA, stronger label skew)"
    )


def partition_indices(
    labels: Sequence[int], n_clients: int, spec: PartitionSpec | str, seed: int
) -> list[list[int]]:
    """N disjoint, covering, ascending index lists over `labels`; a pure function of its inputs."""
    spec = parse_partition(spec) if isinstance(spec, str) else spec
    size = len(labels)
    if n_clients < 1:
        raise ConfigError(f"clients.n must be >= 1, got {n_clients}")
    if size < n_clients:
        raise DataError(
            f"{size} training examples cannot be shared by {n_clients} clients; "
            "use more examples (--train-examples) or fewer clients"
        )
    rng = np.random.default_rng(tensor_seed(seed, f"partition-{spec}-{n_clients}"))
    if spec.kind == "iid":
        blocks = np.array_split(rng.permutation(size), n_clients)
        return [sorted(int(i) for i in block) for block in blocks]
    assert spec.alpha is not None
    by_label: dict[int, np.ndarray] = {}
    for y in sorted(set(labels)):
        by_label[y] = np.array([i for i, label in enumerate(labels) if label == y])
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for members in by_label.values():
            shuffled = rng.permutation(members)
            shares = rng.dirichlet(np.full(n_clients, spec.alpha))  # (N,)
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).round().astype(int)
            for client, chunk in enumerate(np.split(shuffled, cuts)):
                parts[client].extend(int(i) for i in chunk)
        if all(parts):
            return [sorted(part) for part in parts]
    raise DataError(
        f"{spec} left some of {n_clients} clients with no example in {DIRICHLET_TRIES} draws "
        f"over {size} examples; raise ALPHA, use fewer clients or more examples"
    )


def label_counts(labels: Sequence[int], part: Sequence[int], n_labels: int) -> list[int]:
    counts = np.bincount([labels[i] for i in part], minlength=n_labels)
    return [int(c) for c in counts]


def label_skew(labels: Sequence[int], parts: Sequence[Sequence[int]]) -> float:
    """Mean over clients of TV(client label histogram, global label histogram), in [0, 1]."""
    n_labels = max(labels) + 1
    overall = np.bincount(list(labels), minlength=n_labels) / len(labels)
    distances = []
    for part in parts:
        mix = np.bincount([labels[i] for i in part], minlength=n_labels) / len(part)
        distances.append(0.5 * float(np.abs(mix - overall).sum()))
    return float(np.mean(distances))


def write_partition(
    run_dir: Path,
    examples: Sequence[Example],
    parts: Sequence[Sequence[int]],
    spec: PartitionSpec | str,
    seed: int,
) -> list[Path]:
    """One `clients/client-NNN.jsonl` per client (rows in `--train-file` format) and
    `clients/partition.json`; returns the data files, in client order."""
    root = run_dir / CLIENT_DIR
    root.mkdir(parents=True, exist_ok=True)
    labels = [ex.label for ex in examples]
    n_labels = max(len(ex.candidates) for ex in examples)
    files = []
    for client, part in enumerate(parts):
        path = root / f"client-{client:03d}.jsonl"
        lines = []
        for i in part:
            row = examples[i].row
            if row is None:
                raise DataError(f"training example {i} keeps no row to write to {path.name}")
            lines.append(json.dumps(dict(row)) + "\n")
        path.write_text("".join(lines))
        files.append(path)
    meta = {
        "partition": str(spec),
        "seed": seed,
        "clients": len(parts),
        "label_skew": label_skew(labels, parts),
        "sizes": [len(part) for part in parts],
        "label_counts": [label_counts(labels, part, n_labels) for part in parts],
        "files": [path.name for path in files],
        "indices": [list(part) for part in parts],
    }
    (root / "partition.json").write_text(json.dumps(meta) + "\n")
    return files
