"""The counter-based noise generator: distribution, independence, subsets, exact bits, 64-bit keys.

z is a pure function of (seed, tensor name, flat element index). These tests check that it is a
standard normal (KS, moments), that different seeds, names and rows are uncorrelated, that any
subset of rows equals the same rows of the whole tensor, and pin the exact 64-bit hash against an
independent pure-Python implementation (python ints, explicit `% 2**64`), so a platform where
torch's int64 arithmetic does not wrap, or a wrongly emulated logical shift, fails here.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from hosl.zo import noise_for, perturbation_seed, row_noise, tensor_seed
from hosl.zo.cpu_noise import loops, tensor_path
from hosl.zo.seeds import _hash_key

# --- an independent pure-Python reference of the scheme (see hosl.zo.seeds' docstring) ----------

M64 = 2**64
GAMMA = 0x9E3779B97F4A7C15
KEY2_SALT = 0x6A09E667F3BCC909


def ref_key(seed: int, name: str) -> int:
    digest = hashlib.blake2b(repr(("tensor", seed, name)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def ref_mix(x: int) -> int:
    x %= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) % M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) % M64
    return x ^ (x >> 31)


def ref_hash(key: int, j: int) -> int:
    key2 = ref_mix(key ^ KEY2_SALT)
    return ref_mix(ref_mix(key + j * GAMMA) ^ key2)


def ref_normal(key: int, i: int) -> float:
    h = ref_hash(key, i // 2)
    u1 = 1.0 - (h >> 40) / 2**24
    theta = 2.0 * math.pi * (h & (2**24 - 1)) / 2**24
    r = math.sqrt(-2.0 * math.log(u1))
    return r * (math.cos(theta) if i % 2 == 0 else math.sin(theta))


def as_int64(x: int) -> int:
    return x - M64 if x >= 2**63 else x


def test_splitmix64_known_answer() -> None:
    """The first output of splitmix64 seeded with 0 (Vigna's reference) is mix(γ)."""
    assert ref_mix(GAMMA) == 0xE220A8397B1DCDAF


# keys with the top bit clear and set (sign handling), and the extremes
KEYS = [0, 1, 2**63 - 1, 2**63, M64 - 1, ref_key(7, "model.embed_tokens.weight"),
        ref_key(123456789, "layers.0.mlp.weight")]
PAIRS = [0, 1, 2, 3, 1000, 2**31 - 1, 2**32 + 5, 2**40 + 3, 2**62 + 11]


@pytest.mark.parametrize("key", KEYS)
def test_hash_bits_match_the_pure_python_reference(key) -> None:
    got = _hash_key(key, torch.tensor(PAIRS, dtype=torch.int64)).tolist()
    assert got == [as_int64(ref_hash(key, j)) for j in PAIRS]


def test_keys_and_normals_match_the_pure_python_reference() -> None:
    for seed, name in [(0, "w"), (perturbation_seed(0, 757, 0, 0), "model.embed_tokens.weight"),
                       (2**62 + 5, "b")]:
        key = tensor_seed(seed, name)
        assert key == ref_key(seed, name) and 0 <= key < M64
        z = noise_for(torch.empty(37, 11), seed, name).flatten()
        idx = [0, 1, 2, 3, 10, 11, 200, 201, 406]
        want = torch.tensor([ref_normal(key, i) for i in idx], dtype=torch.float32)
        torch.testing.assert_close(z[idx], want, rtol=1e-5, atol=2e-5)
        # rows of odd width start at odd elements: row 5 of (37, 11) is elements 55 … 65
        rows = row_noise(torch.empty(37, 11), seed, name, torch.tensor([5]))
        want = torch.tensor([[ref_normal(key, i) for i in range(55, 66)]])
        torch.testing.assert_close(rows, want, rtol=1e-5, atol=2e-5)


# --- the compiled CPU loops ---------------------------------------------------------------------


def test_the_compiled_loops_are_installed() -> None:
    """numba is a dependency: without it noise is made by tensor operations, the same bits 1.5-1.8x
    slower (benchmarks/results/noise.md), which nobody would notice but in their step times."""
    assert loops() is not None


# sizes around the pass boundaries (4,096-element minimum, 2**17 maximum, odd counts), rows of
# even and odd widths, a whole matrix walked in lean chunks
WHOLE = [(1,), (3,), (37, 11), (4097,), (2**17 + 3,), (1000, 577)]
ROWS = [((1000, 576), [0, 5, 999, 5]), ((1000, 577), [1, 2, 3, 998]), ((4000, 77), range(4000))]


@pytest.mark.parametrize("shape", WHOLE)
def test_compiled_loops_give_the_tensor_operations_bits_for_whole_tensors(shape) -> None:
    for seed, name in [(0, "w"), (2**63 - 1, "model.layers.3.mlp.up_proj.weight")]:
        fast = noise_for(torch.empty(shape), seed, name)
        with tensor_path():
            slow = noise_for(torch.empty(shape), seed, name)
        assert torch.equal(fast, slow), (shape, seed)


@pytest.mark.parametrize(("shape", "rows"), ROWS)
@pytest.mark.parametrize("lean", [False, True])
def test_compiled_loops_give_the_tensor_operations_bits_for_rows(shape, rows, lean) -> None:
    ids = rows if isinstance(rows, range) else torch.tensor(rows)
    fast = row_noise(torch.empty(shape), 9, "e", ids, lean)
    with tensor_path():
        slow = row_noise(torch.empty(shape), 9, "e", ids, lean)
    assert torch.equal(fast, slow)


# --- distribution ------------------------------------------------------------------------------

N = 1_000_000


@pytest.fixture(scope="module")
def sample() -> torch.Tensor:
    # One fixed draw, so the test is deterministic. Over 100 seeds of this name √n·D averaged 0.89
    # (Kolmogorov: 0.87) and exceeded the 10%, 5% and 1% critical values 12, 7 and 1 times.
    return noise_for(torch.empty(N), 0, "model.embed_tokens.weight").double()


def test_kolmogorov_smirnov_against_the_standard_normal(sample) -> None:
    xs = sorted(sample.tolist())
    n = len(xs)
    d = 0.0
    for i, x in enumerate(xs):
        cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
        d = max(d, (i + 1) / n - cdf, cdf - i / n)
    assert d < 1.628 / math.sqrt(n), d  # the 1% critical value


def test_moments_are_those_of_the_standard_normal(sample) -> None:
    assert sample.dtype == torch.float64 and sample.numel() == N
    mean, var = sample.mean().item(), sample.var().item()
    kurtosis = ((sample - mean) ** 4).mean().item() / var**2
    assert abs(mean) < 5 / math.sqrt(N)                      # sd of the mean: 1/√n
    assert abs(var - 1) < 5 * math.sqrt(2 / N)               # sd of the variance: √(2/n)
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / N)         # sd of the kurtosis: √(24/n)
    assert abs((sample.abs() > 3).double().mean().item() - 0.0026998) < 3e-4  # the tails


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_different_seeds_names_and_rows_are_uncorrelated() -> None:
    p = torch.empty(512, 576)
    n = p.numel()
    base = noise_for(p, 3, "model.embed_tokens.weight")
    bound = 5 / math.sqrt(n)
    assert abs(_corr(base, noise_for(p, 4, "model.embed_tokens.weight"))) < bound
    assert abs(_corr(base, noise_for(p, 3, "model.layers.0.mlp.weight"))) < bound
    assert abs(_corr(base[:-1], base[1:])) < 5 / math.sqrt(base[1:].numel())   # row r vs r + 1
    assert abs(_corr(base[:256], base[256:])) < 5 / math.sqrt(n // 2)
    # neighbouring elements (the cos and sin of one hash, and of consecutive hashes)
    flat = base.flatten()
    assert abs(_corr(flat[0::2], flat[1::2])) < 5 / math.sqrt(n // 2)
    assert abs(_corr(flat[:-1], flat[1:])) < 5 / math.sqrt(n)
    assert abs(_corr(flat[1:-1:2], flat[2::2])) < 5 / math.sqrt(n // 2)


def test_keys_a_multiple_of_gamma_apart_do_not_give_shifted_streams() -> None:
    """Plain splitmix64 streams of keys k and k + m·γ are shifted copies; the key2 xor breaks it."""
    key, m = ref_key(1, "w"), 1000
    a = _hash_key(key, torch.arange(m, m + 4096))
    b = _hash_key((key + m * GAMMA) % M64, torch.arange(4096))
    assert not (a == b).any()


# --- subsets, shapes, determinism --------------------------------------------------------------

SHAPES = [(300, 5), (300, 64), (97, 33), (1000, 1), (2, 1001), (41,), (1,), (3, 7, 5), (6, 4, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_any_subset_of_rows_equals_those_rows_of_the_whole(shape) -> None:
    p = torch.empty(shape)
    whole = noise_for(p, 9, "t")
    assert whole.dtype == torch.float32 and whole.shape == p.shape
    v = shape[0]
    rows = torch.tensor([v - 1, 0, v // 2, v // 2, 1 % v, v // 3])
    assert torch.equal(row_noise(p, 9, "t", rows), whole[rows])
    assert torch.equal(row_noise(p, 9, "t", range(v)), whole)
    assert torch.equal(row_noise(p, 9, "t", range(v // 3, v)), whole[v // 3 :])
    assert torch.equal(row_noise(p, 9, "t", range(0, v, 2)), whole[0::2])
    assert row_noise(p, 9, "t", torch.tensor([], dtype=torch.long)).shape == (0, *shape[1:])
    # the same element index gives the same value whatever the tensor's shape
    n = math.prod(shape)
    assert torch.equal(noise_for(torch.empty(n), 9, "t"), whole.flatten())


def test_large_rows_and_subsets_cross_pass_boundaries() -> None:
    """Passes of the generator are an implementation detail: nothing depends on where they fall."""
    p = torch.empty(700, 1000)  # 700k elements: several passes
    whole = noise_for(p, 1, "big")
    rows = torch.randint(0, 700, (500,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(row_noise(p, 1, "big", rows), whole[rows])
    assert torch.equal(noise_for(torch.empty(700_001), 1, "big")[:700_000], whole.flatten())


def test_noise_is_deterministic_float32_whatever_the_parameter_dtype() -> None:
    p = torch.empty(64, 48)
    a = noise_for(p, 5, "x")
    assert torch.equal(a, noise_for(p, 5, "x"))
    assert torch.equal(a, noise_for(p.bfloat16(), 5, "x"))  # float32 whatever the param's dtype
    rows = torch.tensor([3, 60])
    assert torch.equal(row_noise(p.half(), 5, "x", rows), a[rows])
    assert not torch.equal(a, noise_for(p, 6, "x"))


def test_row_noise_needs_no_materialised_parameter() -> None:
    """Only the parameter's shape and device are read: an expanded view of one element will do."""
    p = torch.empty(1, 1).expand(49152, 576)
    rows = torch.tensor([0, 49151])
    z = row_noise(p, 2, "model.embed_tokens.weight", rows)
    assert z.shape == (2, 576) and z.dtype == torch.float32


# --- the 32-bit collisions of the previous generator -------------------------------------------


def test_keys_equal_in_their_low_32_bits_give_different_noise() -> None:
    """tensor_seed(2006, "w") and tensor_seed(67110, "w") differ only above bit 32: torch's CPU
    generator, which keeps the low 32 bits of a seed, drew the same noise for both."""
    k1, k2 = tensor_seed(2006, "w"), tensor_seed(67110, "w")
    assert k1 != k2 and k1 % 2**32 == k2 % 2**32
    old = [torch.randn(100, generator=torch.Generator().manual_seed(k)) for k in (k1, k2)]
    assert torch.equal(*old)  # the collapse this generator removes
    p = torch.empty(100)
    a, b = noise_for(p, 2006, "w"), noise_for(p, 67110, "w")
    assert abs(_corr(a, b)) < 0.5
    # and at the hash level: flipping a bit above 32 changes every hash
    k = ref_key(0, "w")
    pairs = torch.arange(1000)
    assert not (_hash_key(k, pairs) == _hash_key(k ^ (1 << 40), pairs)).any()


def test_rows_whose_old_per_row_seeds_collided_now_differ() -> None:
    """Perturbation seeds of steps 469 (q=3) and 1643 (q=2) (run seed 0, micro-batch 0): the old
    scheme seeded row r of a tensor with tensor_seed + r·stride and torch kept the low 32 bits, so
    row 48814 of the first and row 4000 of the second drew the same 576 numbers."""
    name, stride, mask63 = "model.embed_tokens.weight", 0x9E3779B97F4A7C15, 2**63 - 1
    s1, s2 = perturbation_seed(0, 469, 0, 3), perturbation_seed(0, 1643, 0, 2)
    r1, r2 = 48814, 4000

    def old_row_seed(seed: int, row: int) -> int:
        return ((tensor_seed(seed, name) & mask63) + row * stride) & mask63

    assert old_row_seed(s1, r1) % 2**32 == old_row_seed(s2, r2) % 2**32
    p = torch.empty(1, 1).expand(49152, 576)
    a = row_noise(p, s1, name, torch.tensor([r1]))
    b = row_noise(p, s2, name, torch.tensor([r2]))
    assert not torch.equal(a, b)
    assert abs(_corr(a, b)) < 5 / math.sqrt(576)
