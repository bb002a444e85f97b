"""The ZO engine: exact restore, replay, the fused update, and unbiasedness in expectation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hosl.memory.measure import PartyMeter
from hosl.zo import PerturbedForward, ZoTarget, apply_zo_update_, projected_gradient, row_noise


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(12, 8), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_perturbed_forward_restores_parameters_bit_for_bit() -> None:
    model = _mlp()
    before = _snapshot(model)
    x = torch.arange(6).view(2, 3)
    with torch.inference_mode():
        for seed in range(5):
            with PerturbedForward(ZoTarget(model), seed, 1e-3):
                model(x)
            with PerturbedForward(ZoTarget(model), seed, -1e-3):
                model(x)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)  # bitwise, not allclose


class _TiedLM(nn.Module):
    """Embedding, a hidden layer and a head sharing the embedding matrix (zo-full's shape)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(x))))


@pytest.mark.parametrize("make", [_mlp, _TiedLM])
def test_perturbed_forward_equals_forward_of_explicitly_perturbed_model(make) -> None:
    """Row-wise embedding noise added on lookup == the same z added to the whole matrix."""
    model, copy = make(), make()
    x = torch.tensor([[0, 3, 3], [7, 11, 0]])
    with torch.no_grad():
        copy_target = ZoTarget(copy)
        assert copy_target.row_wise == {"emb.weight" if make is _TiedLM else "0.weight"}
        for name, p in copy_target.named:
            p.add_(0.05 * copy_target.noise(name, p, 11))
        expected = copy(x)
        with PerturbedForward(ZoTarget(model), 11, 0.05):
            got = model(x)
        assert not torch.allclose(got, model(x))  # the perturbation did something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_tied_parameter_gets_one_name_and_one_update() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    target = ZoTarget(model)
    assert [name for name, _ in target.named] == ["emb.weight"]
    before = emb.weight.detach().clone()
    apply_zo_update_(target, [(3, 1.0)], lr=0.1)
    expected = before - 0.1 * target.noise("emb.weight", before, 3)
    torch.testing.assert_close(emb.weight, expected, rtol=0, atol=1e-7)


def test_replaying_the_same_seeds_gives_the_same_model() -> None:
    a, b = _mlp(), _mlp()
    updates = [[(s, 0.3 * (-1) ** s), (s + 100, 0.1)] for s in range(4)]
    for u in updates:
        apply_zo_update_(ZoTarget(a), u, lr=0.01)
        apply_zo_update_(ZoTarget(b), u, lr=0.01)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = _mlp()
    apply_zo_update_(ZoTarget(c), [(999, 0.3)], lr=0.01)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_fused_update_equals_grad_plus_sgd_step() -> None:
    fused, ref = _mlp(), _mlp()
    pairs = [(5, 0.7), (6, -0.2), (7, 1.3)]
    apply_zo_update_(ZoTarget(fused), pairs, lr=0.05)
    target = ZoTarget(ref)
    for name, p in target.named:
        p.grad = sum(c * target.noise(name, p, s) for s, c in pairs)
    torch.optim.SGD(ref.parameters(), lr=0.05).step()
    for pf, pr in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(pf, pr, rtol=0, atol=1e-6)


def test_zo_estimate_points_along_the_true_gradient() -> None:
    """Mean of many two-point estimates ĝ = g·z has cosine > 0.9 with ∇L (d = 249 here)."""
    model = _mlp(1)
    x = torch.arange(12).view(4, 3)
    y = torch.randn(4, 3, 1, generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        return ((model(x) - y) ** 2).mean()

    loss().backward()
    target = ZoTarget(model)
    true_grad = torch.cat([p.grad.flatten() for _, p in target.named])
    estimate = torch.zeros_like(true_grad)
    n, eps = 3000, 1e-3
    with torch.inference_mode():
        for seed in range(n):
            with PerturbedForward(target, seed, eps):
                plus = loss().item()
            with PerturbedForward(target, seed, -eps):
                minus = loss().item()
            g = projected_gradient(plus, minus, eps)
            estimate += g * torch.cat(
                [target.noise(name, p, seed).flatten() for name, p in target.named]
            )
    estimate /= n
    cosine = torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0).item()
    assert cosine > 0.9, cosine
    # and the scale is right: E[ĝ] = ∇L, so the norms agree to within the sampling noise
    assert 0.7 < estimate.norm().item() / true_grad.norm().item() < 1.5


def test_any_subset_of_rows_is_the_same_rows_of_the_whole_noise() -> None:
    weight = torch.empty(300, 5)
    whole = row_noise(weight, 4, "emb.weight", range(300))
    rows = torch.tensor([299, 0, 17, 17, 150])
    torch.testing.assert_close(row_noise(weight, 4, "emb.weight", rows), whole[rows],
                               rtol=0, atol=0)
    assert torch.equal(row_noise(weight, 4, "emb.weight", range(10, 20)), whole[10:20])
    # distinct rows and distinct seeds are distinct draws, standard normal overall
    assert len({tuple(r.tolist()) for r in whole}) == 300
    assert not torch.equal(row_noise(weight, 5, "emb.weight", range(300)), whole)
    assert abs(whole.mean().item()) < 0.1 and abs(whole.std().item() - 1) < 0.1
    # float32 whatever the parameter's dtype (the caller casts): one direction for every copy
    bf16 = row_noise(weight.bfloat16(), 4, "emb.weight", range(300))
    assert bf16.dtype == torch.float32 and torch.equal(bf16, whole)


def test_embedding_noise_costs_the_looked_up_rows_not_the_matrix() -> None:
    """A (5000 × 64) embedding perturbed for 2×3 tokens: the forward and the update each hold
    far less than the 1.28 MB matrix's noise."""
    model = nn.Sequential(nn.Embedding(5000, 64), nn.Linear(64, 1))
    target = ZoTarget(model)
    matrix = 5000 * 64 * 4
    x = torch.tensor([[1, 2, 3], [4, 4, 4999]])
    with torch.inference_mode():
        plain = model(x)
        meter = PartyMeter("zo")
        with meter.phase("forward"), PerturbedForward(target, 3, 1e-3):
            perturbed = model(x)
        assert not torch.equal(plain, perturbed)
        assert meter.peak_bytes < matrix / 20, meter.peak_bytes
    import hosl.zo.engine as engine

    before = model[0].weight.detach().clone()
    meter = PartyMeter("update")
    old = engine.ROW_CHUNK_ELEMENTS
    engine.ROW_CHUNK_ELEMENTS = 64 * 500  # chunks of 500 rows: a tenth of the matrix
    try:
        with meter.phase("update"):
            apply_zo_update_(target, [(3, 1.0)], lr=0.1)
    finally:
        engine.ROW_CHUNK_ELEMENTS = old
    # a chunk's noise plus the generator's working set: passes of max(chunk / 32, 4,096) elements
    # at ~12 bytes each (hosl.zo.seeds); the whole matrix's noise would be ten times the chunk's
    assert meter.peak_bytes <= matrix / 10 + 4096 * 12 + 1024, meter.peak_bytes
    expected = before - 0.1 * target.noise("0.weight", before, 3)
    torch.testing.assert_close(model[0].weight, expected, rtol=0, atol=1e-6)
