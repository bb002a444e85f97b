"""The ZO engine's memory bound: perturbing costs at most one parameter tensor over inference
(plus the noise generator's working set)."""

from __future__ import annotations

import pytest
import torch

from conftest import sentiment_examples, tiny_llama
from hosl.batching import collate
from hosl.memory.measure import PartyMeter
from hosl.models.split import split_model
from hosl.zo import PerturbedForward, ZoTarget


@pytest.mark.parametrize("examples", [1, 16])
def test_perturbed_forward_costs_at_most_the_largest_tensor(tokenizer, examples) -> None:
    # wide enough that a tensor outweighs the noise generator's smallest working set (passes of
    # at least 4,096 elements at ~12 bytes each, hosl.zo.seeds), which a tensor of the default
    # tiny model (2,048 elements) does not
    client, _ = split_model(tiny_llama(layers=3, hidden=64, intermediate=256), 2)
    batch = collate(sentiment_examples(examples), tokenizer, max_length=16)
    target = ZoTarget(client)
    largest = max(p.numel() * p.element_size() for _, p in target.named)

    plain, perturbed = PartyMeter("plain"), PartyMeter("perturbed")
    with torch.inference_mode():
        with plain.phase("forward"):
            out = client(batch.input_ids, batch.attention_mask)
        del out
        with perturbed.phase("forward"), PerturbedForward(target, seed=1, scale=1e-3):
            out = client(batch.input_ids, batch.attention_mask)
        del out
    extra = perturbed.peak_bytes - plain.peak_bytes
    generator = 4096 * 12 + 1024  # its smallest passes' working set (see above)
    assert extra <= largest + generator, (extra, largest)
    if examples == 1:  # parameters dominate a one-example forward: the perturbed copy shows
        assert extra > 0


def test_hosl_client_holds_nothing_but_its_parameters(tokenizer) -> None:
    from hosl.build import build_run
    from test_modes import _cfg

    run = build_run(_cfg("hosl", steps=2), tiny_llama())
    meter = run.client.start_metering("client")
    params = sum(p.numel() * p.element_size() for p in run.client.part.parameters())
    buffers = sum(b.numel() * b.element_size() for b in run.client.part.buffers())
    batch = collate(sentiment_examples(8), tokenizer, 16)
    for step in range(2):
        run.train_step([batch], step)
    assert meter.resident_bytes == params + buffers  # no gradients, no optimizer state
    # nothing left behind between steps but the last update's record: with row-sparse noise
    # (the default) it holds the step's looked-up row ids, which a many-client sync sends
    rows = run.client.last_update.rows
    assert rows, "the default draws row-sparse noise: the record names its rows"
    kept = sum(r.numel() * r.element_size() for per in rows.values() for r in per.values())
    assert meter.transient_bytes == kept
    assert all(p.grad is None for p in run.client.part.parameters())
