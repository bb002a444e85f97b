"""The edge client: owns the data, the embeddings and blocks 0..k-1.

In `hosl` and `zo` modes it only ever runs forward passes under `torch.inference_mode()`: no graph,
no stored activations, no gradients, no optimizer state. In `fo` mode it runs an ordinary forward
with a graph and a backward from the gradient the server returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from hosl.batching import Batch
from hosl.federated.records import ClientUpdate
from hosl.fused_sgd import FusedSgd
from hosl.models.split import Activations, ClientPart
from hosl.parties.state import PartyState
from hosl.zo import PerturbedForward, ZoTarget


class LazyDeltas(Sequence[Tensor]):
    """The 2Q perturbed activations as the wire carries them, one forward pass at a time, when read.

    With a `base` (HOSL: the clean h), element i is hᵢ − h. Without one (ZO-ZO, which has no
    clean pass), a pair travels as h⁺_q and then h⁻_q − h⁺_q. Either way the ε-sized signal is
    a difference, which a low-precision wire rounds relative to its own small size (see
    `hosl.protocol`).

    A streaming transport puts each activation on the wire as soon as its forward pass ends, so
    the server evaluates the first while the client computes the next, and the client holds one
    perturbed activation at a time instead of 2Q (two without a base: h⁺_q until h⁻_q is sent).
    Reading an element again runs its forward again (same seed, same θ_c: the same tensor),
    which is what a resend after a lost connection needs.
    """

    def __init__(
        self,
        party: ClientParty,
        batch: Batch,
        seeds: Sequence[int],
        eps: float,
        base: Tensor | None = None,
    ) -> None:
        self._party, self._batch, self._seeds, self._eps = party, batch, list(seeds), eps
        self._base = base
        self._plus: tuple[int, Tensor] | None = None  # (q, h⁺_q) while h⁻_q is pending
        self._read: set[int] = set()  # pairs q with an element read

    def __len__(self) -> int:
        return 2 * len(self._seeds)

    def _hidden(self, q: int, sign: int) -> Tensor:
        scale = self._eps if sign > 0 else -self._eps
        return self._party.activations(self._batch, self._seeds[q], scale).hidden

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        q, minus = divmod(i % len(self), 2)
        self._read.add(q)
        hidden = self._hidden(q, -1 if minus else +1)  # (S, L, H), an inference tensor
        if self._base is None and not minus:
            self._plus = (q, hidden)
            return hidden
        if self._base is not None:
            base = self._base
        else:
            base = self._plus[1] if self._plus and self._plus[0] == q else self._hidden(q, +1)
            self._plus = None
        with torch.inference_mode():
            return hidden.sub_(base)

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    def look_up_unread_rows(self) -> None:
        """With row-sparse noise, run one forward of each pair nobody read: the rows it looks up
        (a function of the batch) are what the update draws z on. A transport that answers from
        a record (a journal replay) reads none of the activations."""
        if self._party.zo.rows_seen is None:
            return
        for q in range(len(self._seeds)):
            if q not in self._read:
                self._hidden(q, +1)


class PairDifferences(Sequence[Tensor]):
    """The cut-gradient estimator's Q differences h⁺_q − h⁻_q (S, L, H), each made when read:
    the pair's two forward passes, h⁺_q held while h⁻_q runs, then only their difference kept.

    Read one at a time and dropped after use, the client holds one perturbed activation and
    one difference at most, whatever Q is.
    """

    def __init__(self, party: ClientParty, batch: Batch, seeds: Sequence[int], eps: float) -> None:
        self._pairs = LazyDeltas(party, batch, seeds, eps)  # h⁺_q, then h⁻_q − h⁺_q

    def __len__(self) -> int:
        return len(self._pairs) // 2

    def __getitem__(self, q: int) -> Tensor:  # type: ignore[override]
        if not 0 <= q < len(self):
            raise IndexError(q)
        self._pairs[2 * q]  # h⁺_q: kept by `_pairs` until element 2q + 1 is read
        with torch.inference_mode():
            return self._pairs[2 * q + 1].neg_()  # h⁺_q − h⁻_q, in place


class ClientParty(PartyState):
    def __init__(
        self,
        part: ClientPart,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        lazy_pairs: bool = False,
        row_sparse: bool = False,
        fused: FusedSgd | None = None,
    ) -> None:
        self.part = part.eval()  # dropout stays off: ZO differences must see one function
        self.zo = ZoTarget(part)
        if row_sparse:  # embeddings' z only on the rows each perturbation's batch looked up
            self.zo.track_rows()
        self.fused = fused  # fo: each tensor steps during the backward (see hosl.fused_sgd)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lazy_pairs = lazy_pairs  # see LazyDeltas: for transports that stream each activation
        self.last_update: ClientUpdate | None = None  # the record of the last ZO step applied
        # many clients, parallel schedule: a step's record is kept, and applied with the round's
        self.defer_updates = False

    @torch.inference_mode()
    def activations(self, batch: Batch, seed: int | None = None, scale: float = 0.0) -> Activations:
        """h = f_c(x) at θ_c, or at θ_c + scale·z(seed) when a seed is given."""
        if seed is None:
            # float32 whatever the parameters' dtype (see hosl.zo.engine): h is the base that
            # every perturbed h is measured against
            with self.phase("forward"), PerturbedForward(self.zo, None):
                return self.part(batch.input_ids, batch.attention_mask)
        with self.phase("zo_estimate"), PerturbedForward(self.zo, seed, scale):
            return self.part(batch.input_ids, batch.attention_mask)

    def perturbed_deltas(
        self, batch: Batch, seeds: Sequence[int], eps: float, base: Tensor | None = None
    ) -> Sequence[Tensor]:
        """2Q perturbed activations (S, L, H) around the same θ_c, as differences (`LazyDeltas`).

        With `lazy_pairs` each forward pass runs when its element is read; otherwise all run now.
        """
        deltas = LazyDeltas(self, batch, seeds, eps, base)
        return deltas if self.lazy_pairs else list(deltas)

    def pair_differences(
        self, batch: Batch, seeds: Sequence[int], eps: float, lazy: bool = False
    ) -> Sequence[Tensor]:
        """Q differences h⁺_q − h⁻_q (S, L, H), the cut-gradient estimator's (`PairDifferences`):
        with `lazy` each pair's forwards run when it is read; otherwise all run now."""
        pairs = PairDifferences(self, batch, seeds, eps)
        return pairs if lazy else list(pairs)

    def apply_zo(
        self, seeds_and_coefs: Sequence[tuple[int, float]], lr: float, weight_decay: float = 0.0
    ) -> None:
        """Apply one step's update as a `ClientUpdate` record, kept in `last_update`: the record
        is all another client needs to make the same change (see hosl.federated.records)."""
        update = ClientUpdate(
            step=-1, client=-1, lr=lr, weight_decay=weight_decay,
            coefs=tuple((int(seed), float(coef)) for seed, coef in seeds_and_coefs),
            rows=self.zo.take_rows(),
        )
        if not self.defer_updates:
            with self.phase("update"):
                update.apply(self.zo)
        self.last_update = update

    # First-order split (mode `fo`) -------------------------------------------------------------

    def forward_with_graph(self, batch: Batch) -> Activations:
        with self.phase("forward"):
            return self.part(batch.input_ids, batch.attention_mask)

    def start_step(self, step: int) -> None:
        if self.fused is not None:
            self.fused.start_step(step)

    def optimizer_step(self) -> None:
        if self.fused is None:
            super().optimizer_step()
        # fused: every tensor already took its step when its gradient arrived

    def backward(self, acts: Activations, grad_hidden: Tensor) -> None:
        """Finish backpropagation through the client from ∂L/∂h (accumulates into .grad)."""
        with self.phase("backward"):
            acts.hidden.backward(grad_hidden.to(acts.hidden.dtype))
