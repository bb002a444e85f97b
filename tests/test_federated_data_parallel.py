"""The data-parallel server (`hosl.federated.data_parallel`): two CPU ranks (gloo) that each take
part of every step's batch end at the parameters of one process taking the whole batch.

The one-process reference is the ordinary in-process server (`ServerParty.fo_step`) on the two
shards joined by the test into one batch. Shards of 3 and 2 examples: unequal, so a rank that
did not scale its loss by W · B_r / B (plain DDP averaging of per-rank means) ends elsewhere, as
does a rank whose gradients are not all-reduced.

Tolerance, not bits: the reference sums each parameter's gradient over the 5 examples inside
one backward, the ranks sum 3 and 2 and then add the two (gloo's all-reduce) and divide by 2
again, a different order of float32 additions: differences of a few ulps per step, far below
what any broken scaling or missing all-reduce gives (checked: ≥ 1e-3 here).
"""

from __future__ import annotations

import sys
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import WORDS, tiny_llama
from hosl.algos.split_modes import cut
from hosl.batching import Batch, ScoreSpec, random_batch
from hosl.federated.data_parallel import DataParallelServer
from hosl.models.split import split_model
from hosl.parties.server import ServerParty
from hosl.protocol import FoStepRequest

SHARDS = (3, 2)  # examples on rank 0 and rank 1
LENGTH, STEPS, LR = 8, 2, 0.5
TIMEOUT_S = 60.0  # per collective; a healthy run takes about a second
# Every rank's DDP replica and gloo group, kept until the process exits. A rank thread that drops
# them on its way out destroys its gloo group while holding the GIL; the destructor joins gloo's
# worker thread, which may still need the GIL to release its last Python object: a deadlock that
# hung the suite (rank 1 in ~ProcessGroupGloo, its worker waiting for the GIL, rank 0 too).
_ALIVE: list[object] = []


def _shard(step: int, rank: int) -> Batch:
    """Rank `rank`'s examples of `step`: a full random batch (no padding, so rows line up)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return random_batch(SHARDS[rank], LENGTH, len(WORDS), gen, low=4)


def _joined(a: Batch, b: Batch) -> Batch:
    """Two batches as one: b's flat indices shifted past a's sequences, positions, candidates."""
    sa, sb = a.spec, b.spec
    spec = ScoreSpec(
        positions=torch.cat([sa.positions, sb.positions + a.input_ids.numel()]),
        position_index=torch.cat([sa.position_index, sb.position_index + len(sa.positions)]),
        tokens=torch.cat([sa.tokens, sb.tokens]),
        candidate_index=torch.cat(
            [sa.candidate_index, sb.candidate_index + sa.num_examples * sa.num_candidates]),
        labels=torch.cat([sa.labels, sb.labels]),
        num_candidates=sa.num_candidates,
    )
    return Batch(torch.cat([a.input_ids, b.input_ids]),
                 torch.cat([a.attention_mask, b.attention_mask]), spec)


def _parts():
    client, server = split_model(tiny_llama(seed=4), 2)
    return client.eval(), server


def _hidden(client, batch: Batch) -> torch.Tensor:
    with torch.inference_mode():
        hidden = client(batch.input_ids, batch.attention_mask).hidden  # (S, L, H)
    return hidden.clone()  # outside inference mode: a tensor that can require grad


def _gloo_group(store: dist.Store, rank: int, world: int) -> dist.ProcessGroup:
    """Rank `rank`'s gloo group over a store shared in memory: what `init_process_group` builds,
    without making it this process's default group, so that each of several threads of one
    process can hold its own rank. (`ProcessGroupGloo` alone is a backend, not a group, in this
    torch: DDP wants the group wrapping it.) Gloo still moves the tensors over TCP on `lo`."""
    group = dist.ProcessGroup(store, rank, world)
    gloo = dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=TIMEOUT_S))
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
    return group


def _rank(rank: int, world: int, store: dist.Store, parts: tuple, out: dict[int, object]) -> None:
    """One rank: its replica, `STEPS` steps on its shard of each step's batch; its final θ_s and
    returned gradients (or the exception it raised) in out[rank]."""
    try:
        group = _gloo_group(dist.PrefixStore("data-parallel", store), rank, world)
        client, server = parts
        replica = DataParallelServer(server, torch.optim.SGD(server.parameters(), lr=LR), group)
        _ALIVE.append((replica, group))  # never destroyed on this thread, even on an error
        grads = []
        for step in range(STEPS):
            batch = _shard(step, rank)
            _, grad = replica.fo_step(_hidden(client, batch), cut(batch))
            grads.append(grad)
        out[rank] = {"params": [p.detach() for p in server.parameters()], "grads": grads}
    except BaseException as error:  # noqa: BLE001  (re-raised by the test's thread)
        out[rank] = error


def _run_ranks(world: int = 2) -> list[dict]:
    # Threads of this process, not processes: ranks forked from a pytest-xdist worker hung in CI
    # on what earlier tests left running there, and spawned ones (fresh interpreters, each
    # importing torch and transformers) once overran a 180 s deadline on a loaded 2-core machine.
    # The ranks' collectives release the GIL while they wait, so two threads make progress.
    store = dist.HashStore()
    out: dict[int, object] = {}
    # built here, one after the other: model initialisation draws from torch's global generator,
    # which two threads building at once would interleave
    parts = [_parts() for _ in range(world)]
    threads = [threading.Thread(target=_rank, args=(r, world, store, parts[r], out), daemon=True)
               for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2 * TIMEOUT_S)
        assert not thread.is_alive(), f"a rank did not finish in {2 * TIMEOUT_S} s"
    for rank in range(world):
        if isinstance(out[rank], BaseException):
            raise out[rank]
    return [out[r] for r in range(world)]


def _one_process() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    client, server = _parts()
    party = ServerParty(server, torch.optim.SGD(server.parameters(), lr=LR))
    grads = []
    for step in range(STEPS):
        a, b = _shard(step, 0), _shard(step, 1)
        hidden = torch.cat([_hidden(client, a), _hidden(client, b)])
        whole = _joined(a, b)
        reply = party.fo_step(FoStepRequest(step=step, micro=0, update=True, batch=cut(whole),
                                            hidden=hidden))
        grads.append(reply.grad)
    return [p.detach() for p in server.parameters()], grads


@pytest.mark.skipif(not dist.is_available() or sys.platform != "linux",
                    reason="needs torch.distributed with gloo and the loopback device lo")
def test_two_ranks_end_at_the_parameters_of_one_process(monkeypatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # both ranks on the loopback device
    ranks = _run_ranks()
    params, grads = _one_process()
    # the replicas took the same averaged step: bitwise the same θ_s
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p0, p1)
    start = [p.detach() for p in _parts()[1].parameters()]
    moved = max((p - s).abs().max().item() for p, s in zip(params, start))
    assert moved > 1e-2  # the steps changed θ_s well beyond the tolerance below
    for got, want in zip(ranks[0]["params"], params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # each rank's ∂L/∂h is the global mean loss's gradient at its own rows
    for step in range(STEPS):
        joined = torch.cat([ranks[0]["grads"][step], ranks[1]["grads"][step]])
        torch.testing.assert_close(joined, grads[step], rtol=1e-5, atol=1e-8)
