"""Seeds and noise: every perturbation direction z is a pure function of (seed, name, index).

A ZO update is fully described by (step, [(seed, projected_gradient)]): a few bytes to checkpoint,
replay or send to other clients, because each tensor's noise can be regenerated on its own, in any
order, on either side of the split. This module makes that noise.

The generator is counter-based. Element i (flat, row-major index) of the tensor `name` under the
perturbation seed `seed` is a function of three things only:

    key      = tensor_seed(seed, name)           64 bits of blake2b over (seed, name)
    h(key,j) = mix(mix(key + j·γ) ^ key2)         j = i // 2, key2 = mix(key ^ δ), all mod 2**64
    z[2j], z[2j + 1] = Box–Muller(h)              r·cos θ and r·sin θ of one 64-bit hash

`mix` is the splitmix64 finalizer (a bijection of 64-bit words with full avalanche) and γ the
golden-ratio odd constant, so mix(key + j·γ) is the splitmix64 stream of `key`; xoring a second,
key-derived word in and mixing again makes the key enter non-linearly: two keys never yield
shifted copies of one stream, which a plain splitmix64 stream would for keys that differ by a
multiple of γ. The top 24 bits of h give u1 and the low 24 bits u2, so r = sqrt(−2 ln u1) with
u1 = 1 − k·2⁻²⁴ ∈ [2⁻²⁴, 1] (|z| ≤ 5.77, as with 24-bit float uniforms) and θ = 2π·u2.

Why counter-based rather than one seeded torch generator per tensor (or per embedding row):

- any subset of elements — the few thousand rows of an embedding a batch looks up, a chunk of
  rows for the update, or the whole tensor — is one vectorised computation, with no per-row
  generator to seed and no per-row kernel launch, and gives bit-identical values to the same
  elements of the whole tensor;
- keys are full 64-bit words: torch's CPU generator keeps only the low 32 bits of a seed, so
  different steps' seeds and different rows' streams used to collide (two rows of one embedding
  drawing the same noise); here a key collision needs a 64-bit coincidence, and one key's
  elements never overlap another key's because there are no streams to overlap;
- it is plain int64 / float32 tensor arithmetic (int64 products wrap modulo 2**64; logical right
  shifts are arithmetic shifts plus a mask), so the same code runs on CPU and CUDA tensors.

Noise is always returned in float32, on the parameter's device: a caller perturbing a bf16 or
fp16 parameter casts it, so every dtype copy of a model sees the same direction up to rounding.
Generation works through the index range in chunks, writing into the preallocated output, so it
allocates the float32 result plus a working set of at most a few chunks (never a copy of it).
"""

from __future__ import annotations

import hashlib
import math

import torch

from hosl.zo.cpu_noise import normals_

_MASK64 = (1 << 64) - 1
# splitmix64: the Weyl increment γ (2**64 / golden ratio, odd) and the finalizer's multipliers.
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# The second key word is mix(key ^ _KEY2_SALT): unrelated to `key` as far as any test can tell.
_KEY2_SALT = 0x6A09E667F3BCC909
# Uniforms take 24 bits each (float32's mantissa): u1 from bits 40..63, u2 from bits 0..23.
_U_BITS = 24
_U_MASK = (1 << _U_BITS) - 1
_U_SCALE = 2.0**-_U_BITS
_THETA_SCALE = 2.0 * math.pi * _U_SCALE  # θ = 2π·k2·2⁻²⁴
# Rows of a row-wise tensor are regenerated in chunks of about this many elements (4 MB fp32).
ROW_CHUNK_ELEMENTS = 1 << 20
# Elements generated per vectorised pass: the working set is ~8 bytes per element of a pass on top
# of the output (an int64 scratch word and two float32 words per pair): 1 MB on CPU, where larger
# passes stopped paying; on CUDA larger passes mean fewer kernel launches.
_PASS_ELEMENTS = {"cpu": 1 << 17, "cuda": 1 << 21}
# Whole tensors use passes of at most 1/32 of their size, so the working set stays a small fraction
# of the noise itself, but never passes smaller than this (a tensor smaller than it: one pass).
# A pass is some 30 tensor operations whatever its size; at 64 elements a ZO step of a small model
# (hidden 32..64) spent ~7x its time in per-operation overhead. 4,096 elements is a working set of
# ~50 KB (~12 bytes per element with the Weyl ramp), nothing beside any model's activations.
_MIN_PASS_ELEMENTS = 1 << 12
_WHOLE_PASS_FRACTION = 32
# Row subsets a forward looks up (a few MB) are made in passes of the device's pass size with no
# fraction rule: 1,000 rows of a 576-wide embedding then take 5 passes on CPU, where ~30 small ones
# spent more time in per-operation overhead than in arithmetic. A caller short of memory (the
# update, walking a whole matrix in chunks) asks for `lean` passes: the whole-tensor rule.


def _hash(*parts: object) -> int:
    """64 bits of blake2b over `parts`, as an unsigned int."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def perturbation_seed(run_seed: int, step: int, micro_batch: int, q: int) -> int:
    """Seed of perturbation q at (step, micro-batch): deterministic, so a resume replays it."""
    return _hash("perturbation", run_seed, step, micro_batch, q) & ((1 << 63) - 1)


def tensor_seed(seed: int, name: str) -> int:
    """The 64-bit key (an unsigned int < 2**64) of one named tensor under one perturbation seed."""
    return _hash("tensor", seed, name)


def _splitmix_int(x: int) -> int:
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned `x`."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _key_words(key: int) -> tuple[int, int]:
    """(key, key2) of a 64-bit key as int64 values, ready for tensor arithmetic."""
    return _signed(key), _signed(_splitmix_int(key ^ _KEY2_SALT))


def _keys(seed: int, name: str) -> tuple[int, int]:
    """(key, key2) of one tensor as int64 values."""
    return _key_words(tensor_seed(seed, name))


def _shift_xor_(x: torch.Tensor, shift: int, scratch: torch.Tensor) -> None:
    """x ^= x >>> shift (a logical shift of the 64-bit word), in place."""
    torch.bitwise_right_shift(x, shift, out=scratch)
    scratch.bitwise_and_((1 << (64 - shift)) - 1)  # clear the copies of the sign bit
    x.bitwise_xor_(scratch)


def _mix_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    """The splitmix64 finalizer on int64 words, in place (products wrap modulo 2**64)."""
    _shift_xor_(x, 30, scratch)
    x.mul_(_signed(_MIX1))
    _shift_xor_(x, 27, scratch)
    x.mul_(_signed(_MIX2))
    _shift_xor_(x, 31, scratch)


def _hash_weyl_(x: torch.Tensor, key2: int, scratch: torch.Tensor) -> None:
    """Weyl states key + j·γ → h(key, j) = mix(mix(key + j·γ) ^ key2), in place on int64 `x`."""
    _mix_(x, scratch)
    x.bitwise_xor_(key2)
    _mix_(x, scratch)


def _weyl_ramp(n: int, device: torch.device) -> torch.Tensor:
    """0, γ, 2γ, … (n terms, int64, wrapping): key + j0·γ plus this is pairs j0 … j0 + n − 1."""
    return torch.arange(n, dtype=torch.int64, device=device).mul_(_signed(_GAMMA))


def _hash_key(key: int, pairs: torch.Tensor) -> torch.Tensor:
    """h(key, j) for the pair indices j in `pairs`, as int64: the bits the normals are made from."""
    key, key2 = _key_words(key)
    x = pairs.to(torch.int64, copy=True).mul_(_signed(_GAMMA)).add_(key)
    _hash_weyl_(x, key2, torch.empty_like(x))
    return x


class _Scratch:
    """Working buffers for passes of up to `pairs` pairs, reused across the passes of one call."""

    def __init__(self, pairs: int, device: torch.device) -> None:
        self.word = torch.empty(pairs, dtype=torch.int64, device=device)
        self.a = torch.empty(pairs, dtype=torch.float32, device=device)
        self.b = torch.empty(pairs, dtype=torch.float32, device=device)

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if n == self.word.numel():
            return self.word, self.a, self.b
        return self.word[:n], self.a[:n], self.b[:n]


def _normals_(words: torch.Tensor, key2: int, scratch: _Scratch) -> None:
    """Weyl states key + j·γ in `words` (int64, contiguous, n) → 2n standard normals, in place.

    `words.view(torch.float32)` afterwards holds z[2j], z[2j + 1] for each pair index j. On the
    CPU the hash runs as compiled loops where numba is installed (`hosl.zo.cpu_noise`, the same
    bits, 1.5-1.8x faster: benchmarks/results/noise.md); elsewhere as tensor operations.
    """
    word, r, theta = scratch.take(words.numel())
    if words.device.type == "cpu" and normals_(
        words, key2, r, theta, word.view(torch.float32)[: words.numel()]
    ):
        return
    _normals_torch_(words, key2, scratch)


def _normals_torch_(words: torch.Tensor, key2: int, scratch: _Scratch) -> None:
    """`_normals_` as tensor operations: any device (the portable path, and the reference the
    compiled CPU loops are tested against)."""
    word, r, theta = scratch.take(words.numel())
    _hash_weyl_(words, key2, word)
    # u1 = 1 − k1·2⁻²⁴ ∈ [2⁻²⁴, 1] from the top 24 bits k1, θ = 2π·k2·2⁻²⁴ from the low 24 bits k2
    # (int64 → float32 is exact below 2**24)
    torch.bitwise_right_shift(words, 64 - _U_BITS, out=word)
    word.bitwise_and_(_U_MASK)
    r.copy_(word)
    r.mul_(-_U_SCALE).add_(1.0).log_().mul_(-2.0).sqrt_()
    torch.bitwise_and(words, _U_MASK, out=word)
    theta.copy_(word)
    theta.mul_(_THETA_SCALE)
    out = words.view(torch.float32).view(-1, 2)  # the hashes are no longer needed
    cos_or_sin = word.view(torch.float32)[: words.numel()]
    torch.cos(theta, out=cos_or_sin)
    torch.mul(r, cos_or_sin, out=out[:, 0])
    torch.sin(theta, out=cos_or_sin)
    torch.mul(r, cos_or_sin, out=out[:, 1])


def _pass_elements(
    numel: int, device: torch.device, fraction: int = _WHOLE_PASS_FRACTION
) -> int:
    """Elements per pass: even, at most the device's pass size and numel / `fraction` (whole
    tensors: 1/32; a row subset a forward looks up: 1, see `_fill_rows_`)."""
    top = _PASS_ELEMENTS.get(device.type, _PASS_ELEMENTS["cuda"])
    return max(_MIN_PASS_ELEMENTS, min(top, numel // fraction)) & ~1


def _fill_flat_(out: torch.Tensor, key: int, key2: int) -> None:
    """out (contiguous float32, 1-D) ← z[0 : out.numel()] of the key."""
    n = out.numel()
    even = n & ~1
    step = max(2, min(_pass_elements(n, out.device), even))
    scratch = _Scratch(step // 2 + 1, out.device)
    ramp = _weyl_ramp(step // 2 + 1, out.device)
    for start in range(0, even, step):
        stop = min(start + step, even)
        words = out[start:stop].view(torch.int64)
        torch.add(ramp[: words.numel()], _signed(key + (start // 2) * _GAMMA), out=words)
        _normals_(words, key2, scratch)
    if n & 1:  # the last element is the first half of pair n // 2
        words = ramp[:1].add(_signed(key + (n // 2) * _GAMMA))
        _normals_(words, key2, scratch)
        out[-1] = words.view(torch.float32)[0]


def _fill_rows_(
    out: torch.Tensor, rows: torch.Tensor, width: int, key: int, key2: int, lean: bool
) -> None:
    """out (contiguous float32, len(rows) × width) ← those rows of z viewed as (-1, width)."""
    if out.numel() == 0:
        return
    fraction = _WHOLE_PASS_FRACTION if lean else 1
    step_rows = min(len(rows), max(1, _pass_elements(out.numel(), out.device, fraction) // width))
    if width % 2 == 0:
        # every row starts at an even element: its pairs are r·width/2 + 0 … width/2 − 1, and
        # their normals land exactly on the row
        half = width // 2
        ramp = _weyl_ramp(half, out.device)
        scratch = _Scratch(step_rows * half, out.device)
        for start in range(0, len(rows), step_rows):
            block = rows[start : start + step_rows]
            first = block * _signed(half * _GAMMA) + key  # Weyl state of each row's first pair
            words = out[start : start + len(block)].view(torch.int64)  # (R, width / 2)
            torch.add(first.unsqueeze(1), ramp, out=words)
            _normals_(words.view(-1), key2, scratch)
        return
    # odd widths: row r starts at element r·width, which is odd for odd r; make the width + 1
    # normals of pairs ⌊r·width / 2⌋ … and keep the row's `width` of them
    pairs = (width + 1) // 2  # 2·pairs = width + 1 normals, enough from either parity
    ramp = _weyl_ramp(pairs, out.device)
    scratch = _Scratch(step_rows * pairs, out.device)
    for start in range(0, len(rows), step_rows):
        block = rows[start : start + step_rows]
        first = block * width
        words = torch.add(((first >> 1) * _signed(_GAMMA) + key).unsqueeze(1), ramp)
        _normals_(words.view(-1), key2, scratch)
        normals = words.view(torch.float32)  # (R, width + 1)
        odd = (first & 1).bool().unsqueeze(1)
        torch.where(odd, normals[:, 1:], normals[:, :width], out=out[start : start + len(block)])


def noise_for(param: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """z ~ N(0, I) shaped like `param`, a pure function of (seed, name): float32, param's device.

    The caller casts for a non-float32 parameter, so all dtype copies share one direction.
    """
    out = torch.empty(param.shape, dtype=torch.float32, device=param.device)
    _fill_flat_(out.view(-1), *_keys(seed, name))
    return out


def row_noise(
    param: torch.Tensor, seed: int, name: str, rows: torch.Tensor | range, lean: bool = False
) -> torch.Tensor:
    """Rows `rows` of `noise_for(param, seed, name)`: (len(rows), *param.shape[1:]), float32.

    Bit for bit the same rows as the whole tensor's z, made in one vectorised pass (per chunk) over
    just those rows: a forward generates only the embedding rows it looks up, and the update can
    walk the whole matrix in chunks of rows (`lean`: a working set of a few percent of the rows'
    noise, in smaller and slower passes).
    """
    if isinstance(rows, range):
        rows = torch.arange(rows.start, rows.stop, rows.step, device=param.device)
    rows = rows.to(device=param.device, dtype=torch.int64).reshape(-1)
    width = math.prod(param.shape[1:])
    out = torch.empty((len(rows), *param.shape[1:]), dtype=torch.float32, device=param.device)
    _fill_rows_(out.view(len(rows), width), rows, width, *_keys(seed, name), lean)
    return out
