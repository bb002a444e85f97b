"""PartyMeter counts live tensor bytes exactly: allocations, views, frees, graphs and gradients."""

from __future__ import annotations

import psutil
import pytest
import torch
from torch import nn

from hosl.memory.measure import PartyMeter, module_state_bytes, peak_rss_bytes, tensor_bytes

FLOAT = 4  # bytes per float32 element


def test_allocation_counts_exact_bytes_and_frees_go_back_down():
    meter = PartyMeter("client")
    meter.set_resident(1000)
    with meter.phase("work"):
        x = torch.empty(1000, 1000)
        assert meter.transient_bytes == 4_000_000
    assert meter.phase_peaks() == {"work": 1000 + 4_000_000}
    # Still alive after the phase: still counted, until freed.
    assert meter.current_bytes == 1000 + 4_000_000
    del x
    assert meter.transient_bytes == 0
    assert meter.current_bytes == 1000


def test_views_do_not_double_count_but_copies_do():
    meter = PartyMeter("client")
    with meter.phase("views"):
        x = torch.zeros(1000, 1000)
        views = [x[::2], x.t(), x.view(-1), x[10:20], x.unsqueeze(0).expand(3, -1, -1)]
        assert meter.transient_bytes == 4_000_000
        copy = x.t().contiguous()
        assert meter.transient_bytes == 8_000_000
        del x
        assert meter.transient_bytes == 8_000_000  # the views keep the storage alive
        del views
        assert meter.transient_bytes == 4_000_000
        del copy
    assert meter.transient_bytes == 0
    assert meter.peak_bytes == 8_000_000


def test_peak_is_the_high_water_mark_of_a_phase():
    meter = PartyMeter("server")
    with meter.phase("step"):
        a = torch.ones(250_000)  # 1 MB
        b = torch.ones(500_000)  # 2 MB
        del a, b
        c = torch.ones(100_000)  # 0.4 MB
        assert meter.transient_bytes == 400_000
    assert meter.phase_peaks()["step"] == 3_000_000
    del c


def test_in_place_updates_of_existing_tensors_are_not_counted():
    weight = torch.zeros(1000)
    meter = PartyMeter("client")
    with meter.phase("perturb"), torch.inference_mode():
        weight.add_(1.0)
        weight.mul_(2.0)
        weight[:10].zero_()
        assert meter.transient_bytes == 0
        z = torch.randn(1000)  # the noise tensor is a real allocation
        weight.add_(z, alpha=1e-3)
        assert meter.transient_bytes == 1000 * FLOAT
        del z
    assert meter.phase_peaks()["perturb"] == 1000 * FLOAT
    assert meter.transient_bytes == 0


def test_resize_of_a_tracked_storage_changes_its_size():
    meter = PartyMeter("client")
    with meter.phase("resize"):
        x = torch.empty(10)
        x.resize_(1000)
        assert meter.transient_bytes == 1000 * FLOAT
    del x
    assert meter.transient_bytes == 0


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


MLP_PARAM_BYTES = (64 * 128 + 128 + 128 * 32 + 32) * FLOAT


def test_inference_mode_forward_peak_matches_hand_count():
    mlp, batch = _mlp(), 16
    inputs = torch.randn(batch, 64)
    meter = PartyMeter("client")
    assert meter.set_resident_state(mlp) == MLP_PARAM_BYTES
    with torch.inference_mode(), meter.phase("forward"):
        out = mlp(inputs)
    # Linear1 output and ReLU output are live together; then the ReLU output and Linear2's
    # output (the Sequential drops each intermediate as soon as the next exists).
    expected = max(2 * batch * 128, batch * 128 + batch * 32) * FLOAT
    assert meter.phase_peaks()["forward"] == MLP_PARAM_BYTES + expected
    assert meter.transient_bytes == batch * 32 * FLOAT  # only the output is left
    del out


def test_backward_keeps_saved_activations_and_counts_gradients():
    mlp, batch = _mlp(), 16
    inputs = torch.randn(batch, 64)
    meter = PartyMeter("server")
    meter.set_resident_state(mlp)
    with meter.phase("forward"):
        out = mlp(inputs)
        loss = out.square().sum()
    # Saved for backward: the ReLU output (ReLU saves its result; Linear2 saves its input, the
    # same tensor) and `out` (saved by square). Linear1's output is freed. Plus the scalar loss.
    saved = batch * 128 * FLOAT + batch * 32 * FLOAT
    assert meter.transient_bytes == saved + FLOAT
    with meter.phase("backward"):
        loss.backward()
    grads = MLP_PARAM_BYTES
    assert meter.transient_bytes == grads + batch * 32 * FLOAT + FLOAT  # grads, out, loss
    assert meter.phase_peaks()["backward"] > MLP_PARAM_BYTES + grads
    # Adopting the gradients moves them into the resident bytes, counted once.
    assert meter.set_resident_state(mlp) == 2 * MLP_PARAM_BYTES
    assert meter.transient_bytes == batch * 32 * FLOAT + FLOAT
    assert meter.current_bytes == module_state_bytes(mlp) + batch * 32 * FLOAT + FLOAT
    del out, loss


def test_phases_nest_and_repeat_keeping_the_max_per_name():
    meter = PartyMeter("client")
    with meter.phase("step"):
        for size in (1000, 3000, 2000):
            with meter.phase("estimate"):
                x = torch.empty(size)
                del x
        big = torch.empty(5000)
        del big
    assert meter.phase_peaks() == {"estimate": 3000 * FLOAT, "step": 5000 * FLOAT}
    meter.reset()
    assert meter.phase_peaks() == {}


def test_nested_meters_count_each_allocation_once_in_the_innermost():
    client, server = PartyMeter("client"), PartyMeter("server")
    with client.phase("step"):
        h = torch.empty(1000)
        with server.phase("step"):
            s = torch.empty(3000)
        assert server.transient_bytes == 3000 * FLOAT
        assert client.transient_bytes == 1000 * FLOAT
    assert client.peak_bytes == 1000 * FLOAT
    assert server.peak_bytes == 3000 * FLOAT
    del h, s


def test_meters_of_two_parties_are_independent_when_sequential():
    client, server = PartyMeter("client"), PartyMeter("server")
    with client.phase("forward"):
        h = torch.empty(2000)
    with server.phase("forward"):
        out = h * 2
    assert client.transient_bytes == 2000 * FLOAT
    assert server.transient_bytes == 2000 * FLOAT
    del h
    assert client.transient_bytes == 0
    del out
    assert server.transient_bytes == 0


def test_tensor_bytes_counts_shared_storages_once():
    x = torch.empty(100)
    assert tensor_bytes([x, x[2:], x.view(10, 10), None]) == 100 * FLOAT
    assert tensor_bytes([x, torch.empty(50, dtype=torch.bfloat16)]) == 100 * FLOAT + 100


def test_module_state_bytes_with_tied_weights_grads_and_adamw_state():
    embedding = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = embedding.weight  # tied: one storage
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    params = 100 * 16 * FLOAT
    assert module_state_bytes(model) == params
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    head(embedding(torch.tensor([1, 2]))).sum().backward()
    optimizer.step()
    # parameters + gradient + exp_avg + exp_avg_sq + one float32 step counter.
    assert module_state_bytes(model, optimizer) == 4 * params + FLOAT


def test_peak_rss_is_in_bytes_and_at_least_the_current_rss():
    peak = peak_rss_bytes()
    assert peak >= psutil.Process().memory_info().rss * 0.9
    assert peak < 1 << 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_phase_uses_the_allocator_peak():
    meter = PartyMeter("client", "cuda")
    assert meter.method == "allocator"
    with meter.phase("work"):
        x = torch.empty(1024, 1024, device="cuda")
        del x
    assert meter.phase_peaks()["work"] >= 4 * 1024 * 1024


def test_sparse_gradients_count_their_indices_and_values():
    """A sparse embedding's gradient (a fused update's) is its looked-up rows and their int64
    indices, counted while it lives and given back when it is freed."""
    embedding = nn.Embedding(1000, 16, sparse=True)
    ids = torch.tensor([[3, 7, 7, 9, 11]])  # (1, 5): five rows looked up, one twice
    meter = PartyMeter("client")
    meter.set_resident_state(embedding)
    with meter.phase("backward"):
        embedding(ids).sum().backward()
        grad = embedding.weight.grad
        assert grad.is_sparse
        # uncoalesced: one value row and one index per lookup
        assert meter.transient_bytes >= 5 * 16 * FLOAT + 5 * 8
        assert meter.transient_bytes < 1000 * 16 * FLOAT / 10  # never a (V, d) gradient
        embedding.weight.grad = None
        del grad
    assert meter.transient_bytes == 0
    sparse = torch.sparse_coo_tensor(ids, torch.ones(5, 16), check_invariants=True)  # 5 rows
    assert tensor_bytes([sparse]) == 5 * 8 + 5 * 16 * FLOAT
