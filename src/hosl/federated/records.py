"""A client's ZO update as a record, and the ordered log of every update applied to θ_c.

A ZO client update is fully described by a few numbers: the perturbation seeds of its step, each
seed's scaled projected gradient c_i = g_i / (Q·A), the learning rate and weight decay it was
applied with, and (row-sparse embedding noise) the embedding rows each seed's forwards looked up.
`apply_zo_update_` regenerates every z_i from its seed, so applying the same records, in the same
order, to the same θ_c gives the same bits on any client: no parameter needs to cross the wire.

`ClientUpdate.encode` is the record as it would travel (little-endian, fixed layout; see
docs/many_clients.md): its length is the byte count a client uploads or downloads for it.

`UpdateLog` is the server's ordered list of applied updates: `append` records, `since(i)` gives
what a client that has applied the first i still lacks, and `state_dict` stores it in a checkpoint
(one uint8 tensor and its offsets, which `torch.load(weights_only=True)` reads back).

The log's chain digest (`chain`): d_0 = LOG_GENESIS, d_{i+1} = sha256(d_i ‖ record i's encoding).
d_i names the first i records: a client that keeps it beside its cursor can show a server it holds
exactly the server's first `cursor` records, and not other records at the same positions (say of
a server restarted from an older checkpoint that has since logged other clients' steps).

Why not the server's step journal (`hosl.transport.ledger`)? A journal entry is a server reply
(2Q losses per micro-batch): rebuilding an update from it needs the batch that produced it, since
the seeds come from the run seed but the rows come from the batch's token ids, and the cut-grad
estimator's coefficients come from the client's own activations. A client cannot rerun another
client's batch (it does not hold that data), so the log keeps the updates themselves.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hosl.zo import ZoTarget, apply_zo_update_

# step, client, lr, weight decay, number of (seed, coefficient) pairs, number of row groups
_HEADER = struct.Struct("<qiddII")
_PAIR = struct.Struct("<Qd")  # seed (uint64), scaled projected gradient (float64)
_GROUP = struct.Struct("<IHI")  # index of the seed among the pairs, name bytes, row count

Rows = Mapping[int, Mapping[str, torch.Tensor]]  # {seed: {tensor name: sorted unique row ids}}

LOG_GENESIS = hashlib.sha256(b"hosl update log").digest()  # the digest of the empty log


def chain(digest: bytes, encoded: bytes) -> bytes:
    """The log's digest after one more record (`encoded`: the record as `ClientUpdate.encode`
    gives it)."""
    return hashlib.sha256(digest + encoded).digest()


@dataclass(frozen=True)
class ClientUpdate:
    """One applied client step: θ_c −= lr · (Σ_i c_i z_i + weight_decay · θ_c)."""

    step: int  # the global training step that produced it
    client: int  # which client computed it (bookkeeping: applying it does not depend on it)
    lr: float
    weight_decay: float
    coefs: tuple[tuple[int, float], ...]  # (seed_i, c_i)
    rows: Rows | None = None  # row-sparse noise: the rows each seed's z lives on

    def apply(self, target: ZoTarget) -> None:
        """Apply to `target`: the one code path of a live step and of every replay."""
        rows = None
        if self.rows:
            device = target.named[0][1].device
            rows = {
                seed: {name: ids.to(device) for name, ids in per_name.items()}
                for seed, per_name in self.rows.items()
            }
        apply_zo_update_(target, list(self.coefs), self.lr, self.weight_decay, rows)

    def encode(self) -> bytes:
        seeds = [seed for seed, _ in self.coefs]
        groups = [
            (seeds.index(seed), name, ids)
            for seed, per_name in (self.rows or {}).items()
            for name, ids in per_name.items()
        ]
        out = [_HEADER.pack(self.step, self.client, self.lr, self.weight_decay,
                            len(self.coefs), len(groups))]
        out += [_PAIR.pack(seed, coef) for seed, coef in self.coefs]
        for index, name, ids in groups:
            name_bytes = name.encode()
            out.append(_GROUP.pack(index, len(name_bytes), ids.numel()))
            out.append(name_bytes)
            out.append(ids.to("cpu", torch.int32).numpy().astype("<u4").tobytes())
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> ClientUpdate:
        step, client, lr, wd, n_pairs, n_groups = _HEADER.unpack_from(data, 0)
        at = _HEADER.size
        coefs = []
        for _ in range(n_pairs):
            coefs.append(_PAIR.unpack_from(data, at))
            at += _PAIR.size
        rows: dict[int, dict[str, torch.Tensor]] = {}
        for _ in range(n_groups):
            index, name_len, count = _GROUP.unpack_from(data, at)
            at += _GROUP.size
            name = data[at : at + name_len].decode()
            at += name_len
            ids = torch.frombuffer(bytearray(data[at : at + 4 * count]), dtype=torch.int32)
            at += 4 * count
            rows.setdefault(coefs[index][0], {})[name] = ids.to(torch.int64)
        if at != len(data):
            raise ValueError(f"a client update record of {len(data)} bytes holds {at}")
        return cls(step, client, lr, wd, tuple(coefs), rows or None)


class UpdateLog:
    """Every client update applied to θ_c, in order; record i is `since(i)[0]`."""

    def __init__(self) -> None:
        self._records: list[ClientUpdate] = []
        self._sizes: list[int] = []  # encoded bytes of each record
        self._encoded: list[bytes] = []
        self._chain: list[bytes] = [LOG_GENESIS]  # digest of the first i records, i = 0..len

    def __len__(self) -> int:
        return len(self._records)

    def append(self, records: Iterable[ClientUpdate]) -> int:
        """Add records in order; returns the new length."""
        for record in records:
            self.append_encoded(record, record.encode())
        return len(self)

    def append_encoded(self, record: ClientUpdate, encoded: bytes) -> int:
        """Add one record whose canonical encoding the caller already holds (`record.encode()`,
        as a server that checked a client's bytes has it); returns the new length."""
        self._records.append(record)
        self._encoded.append(encoded)
        self._sizes.append(len(encoded))
        self._chain.append(chain(self._chain[-1], encoded))
        return len(self)

    def digest(self, index: int) -> bytes:
        """The chain digest of the first `index` records."""
        if not 0 <= index <= len(self):
            raise IndexError(f"log index {index} outside 0..{len(self)}")
        return self._chain[index]

    def since(self, index: int) -> list[ClientUpdate]:
        """The records a client that has applied the first `index` still lacks."""
        if not 0 <= index <= len(self):
            raise IndexError(f"log index {index} outside 0..{len(self)}")
        return self._records[index:]

    def encoded_since(self, index: int, stop: int | None = None) -> list[bytes]:
        """`since(index)` (up to record `stop`) as the wire carries it."""
        return self._encoded[index:stop]

    def sized_since(self, index: int) -> list[tuple[ClientUpdate, int]]:
        """`since(index)`, each record with its encoded size."""
        return list(zip(self.since(index), self._sizes[index:]))

    def nbytes(self, start: int = 0, stop: int | None = None) -> int:
        """Encoded bytes of records start..stop-1."""
        return sum(self._sizes[start:stop])

    def state_dict(self) -> dict[str, torch.Tensor]:
        data = b"".join(self._encoded)
        return {
            "data": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
            else torch.zeros(0, dtype=torch.uint8),
            "sizes": torch.tensor(self._sizes, dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        data = bytes(state["data"].numpy().tobytes())
        self._records, self._sizes, self._encoded = [], [], []
        self._chain = [LOG_GENESIS]
        at = 0
        chunks = []
        for size in state["sizes"].tolist():
            chunks.append(data[at : at + size])
            at += size
        self.append(ClientUpdate.decode(chunk) for chunk in chunks)


def replay(target: ZoTarget, records: Sequence[ClientUpdate]) -> None:
    """Apply `records` to `target` in order: a client catching up with the log."""
    for record in records:
        record.apply(target)
