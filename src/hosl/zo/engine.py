"""Perturb-on-use, central differences and the seeded update.

MeZO perturbs θ in place (θ += εz, θ −= 2εz, θ += εz). In floating point that round trip does not
restore θ bit for bit, and it draws z three times per pair. Here the perturbation is applied *on
use*: while a `PerturbedForward` is active, a forward pre-hook on each module that owns trainable
parameters swaps in θ + scale·z for that module alone, and a forward hook swaps θ back. So

- θ itself is never modified by an estimate: restoring is exact by construction;
- the extra memory is one module's perturbed parameters at a time, never a model-sized buffer;
- z is drawn twice per pair (for h⁺ and h⁻) instead of three times.

Embedding matrices are the exception that matters (V × d, the largest tensor of a small model):
a plain `nn.Embedding` is perturbed by adding scale·z[ids] to its output, with z drawn for the
looked-up rows only (`row_noise`: the same rows as the whole tensor's z, bit for bit), so a
forward makes (B·L × d) of noise instead of (V × d), and the update walks the matrix in chunks of
rows.

The update θ −= lr · Σ_i c_i z_i regenerates each z_i from its seed one tensor (or one chunk of
rows) at a time.

Low precision (bf16 parameters). A ZO estimate reads an ε-sized change of the loss, which bf16
(8 bits of mantissa, about 0.4% of θ) would round away twice: in θ + εz, and in every
activation. So a party whose parameters are stored in bf16 computes in float32: each module's
θ (+ scale·z) is formed in float32 on use, one module at a time, and its activations stay
float32 (`PerturbedForward` with no seed does the same for a clean forward). No float32 copy of
the model is ever held. Its update is rounded stochastically (`_stochastic_round`): an update
smaller than half a bf16 step (most of them, at ZO learning rates) lands with the right
probability instead of vanishing, so the expected update is the intended one. The rounding's
random bits are a pure function of the step's records, so a replay rounds identically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from hosl.dtypes import compute_dtype
from hosl.errors import check_finite_update
from hosl.zo.seeds import ROW_CHUNK_ELEMENTS, noise_for, row_noise, tensor_seed


class ZoTarget:
    """The trainable parameters of a module, each under one canonical name.

    The name keys the tensor's noise. A split part carries the whole model's names
    (`module.model_names`, see `hosl.models.split`), so every tensor's name is unique across
    the client and the server, and equal to its name in the unsplit model. A parameter shared by
    two modules (a tied embedding and head) gets one name, so both uses see the same noise and
    the update touches it once.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        model_names: dict[str, str] = getattr(module, "model_names", {})
        # named_parameters() de-duplicates shared tensors: the first name is the canonical one.
        self.named: list[tuple[str, nn.Parameter]] = [
            (model_names.get(name, name), p)
            for name, p in module.named_parameters()
            if p.requires_grad
        ]
        self._name_of = {id(p): name for name, p in self.named}
        # Names of embedding matrices (also when a head shares them): their noise is row-wise.
        self.row_wise: set[str] = {
            self._name_of[id(m.weight)]
            for m in module.modules()
            if isinstance(m, nn.Embedding) and id(m.weight) in self._name_of
        }
        # Row-sparse noise (`track_rows`): the rows each perturbation's forwards looked up,
        # {seed: {name: sorted unique row ids}}; the update then draws z on those rows only.
        self.rows_seen: dict[int, dict[str, torch.Tensor]] | None = None

    def track_rows(self) -> None:
        """From now on, record the rows each perturbed forward looks up (see `rows_seen`)."""
        self.rows_seen = {}

    def note_rows(self, seed: int, name: str, rows: torch.Tensor) -> None:
        if self.rows_seen is None:
            return  # not tracking: every row of z is drawn in the update
        seen = self.rows_seen.setdefault(seed, {})
        previous = seen.get(name)
        seen[name] = rows if previous is None else torch.cat([previous, rows]).unique()

    def take_rows(self) -> dict[int, dict[str, torch.Tensor]] | None:
        """The rows recorded since the last call (None when not tracking), and forget them."""
        if self.rows_seen is None:
            return None
        taken, self.rows_seen = self.rows_seen, {}
        return taken

    def noise(self, name: str, param: torch.Tensor, seed: int) -> torch.Tensor:
        """The whole z of one named tensor under `seed` (float32)."""
        return noise_for(param, seed, name)

    @property
    def low_precision(self) -> bool:
        """True when some parameter is stored below float32: forwards then compute in float32.
        Frozen ones count too: a float32 adapter over a bf16 base computes in float32 as well."""
        return any(p.dtype.itemsize < 4 for p in self.module.parameters())

    def __len__(self) -> int:
        return len(self.named)

    def numel(self) -> int:
        return sum(p.numel() for _, p in self.named)

    def owners(self) -> Iterator[tuple[nn.Module, list[tuple[str, str | None]]]]:
        """Each module that directly owns trainable parameters, with (attribute, canonical name).

        In a low-precision target, modules that own frozen parameters below float32 (the base
        under a LoRA adapter) are owners too, with name None: they are cast, never perturbed.
        """
        cast_frozen = self.low_precision
        for module in self.module.modules():
            owned: list[tuple[str, str | None]] = [
                (attr, self._name_of.get(id(p)))
                for attr, p in module.named_parameters(recurse=False)
                if id(p) in self._name_of or (cast_frozen and p.dtype.itemsize < 4)
            ]
            if owned:
                yield module, owned


@contextmanager
def PerturbedForward(  # noqa: N802
    target: ZoTarget, seed: int | None, scale: float = 0.0
) -> Iterator[None]:
    """While active, every forward through `target.module` sees θ + scale·z(seed), in float32.

    With `seed=None` nothing is perturbed: the forward only computes in float32 (a no-op for a
    float32 target).
    """
    if seed is None and not target.low_precision:
        yield
        return
    handles = []
    for module, owned in target.owners():
        if _looks_up_rows(module, owned, target):
            hook = _add_row_noise(target, owned[0][1], seed, scale)
            handles.append(module.register_forward_hook(hook))
            continue
        if _frozen_lookup(module, owned):  # its looked-up rows in float32, never a (V, d) copy
            handles.append(module.register_forward_hook(_rows_in_float32))
            continue
        stash: dict[str, nn.Parameter] = {}

        def swap_in(mod: nn.Module, _args: object, owned=owned, stash=stash) -> None:
            for attr, name in owned:
                param = mod._parameters[attr]
                if not isinstance(param, nn.Parameter):
                    continue  # an enclosing PerturbedForward already swapped it in
                stash[attr] = param
                if seed is None or name is None:  # a clean forward, or a frozen tensor
                    perturbed = param.detach().to(compute_dtype(param.dtype))
                else:  # one new tensor: z, scaled and shifted in place into θ + scale·z
                    z = noise_for(param, seed, name).to(compute_dtype(param.dtype))
                    perturbed = z.mul_(scale).add_(param.detach())
                mod._parameters[attr] = perturbed  # a plain tensor, only for this call

        def swap_out(mod: nn.Module, _args: object, _out: object, owned=owned, stash=stash) -> None:
            for attr, _ in owned:
                if attr in stash:
                    mod._parameters[attr] = stash.pop(attr)

        handles.append(module.register_forward_pre_hook(swap_in))
        handles.append(module.register_forward_hook(swap_out, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _looks_up_rows(
    module: nn.Module, owned: list[tuple[str, str | None]], target: ZoTarget
) -> bool:
    """A plain nn.Embedding (no max_norm renormalisation) whose weight's noise is row-wise."""
    return (
        type(module) is nn.Embedding  # subclasses (OPT's positions) may remap their input
        and module.max_norm is None
        and [attr for attr, _ in owned] == ["weight"]
        and owned[0][1] in target.row_wise
    )


def _frozen_lookup(module: nn.Module, owned: list[tuple[str, str | None]]) -> bool:
    """A plain nn.Embedding whose weight is frozen (cast only, see `ZoTarget.owners`)."""
    return type(module) is nn.Embedding and module.max_norm is None and owned == [("weight", None)]


def _rows_in_float32(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.to(compute_dtype(out.dtype))  # (B, L, d)


def _add_row_noise(target: ZoTarget, name: str, seed: int | None, scale: float):  # noqa: ANN202
    """Forward hook: (θ + scale·z)[ids] computed as θ[ids] + scale·z[ids], z drawn for ids only.
    The rows are noted in `target` (when it tracks them) for a row-sparse update."""

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(out.dtype)
        if seed is None:
            return out.to(dtype)                                     # (B, L, d)
        ids = args[0]                                                # (B, L) token ids
        rows, where = torch.unique(ids, return_inverse=True)         # (U,), (B, L)
        target.note_rows(seed, name, rows)
        z = row_noise(mod.weight, seed, name, rows).to(dtype)        # (U, d)
        return z.mul_(scale)[where].add_(out)                        # (B, L, d)

    return hook


# A bf16 tensor's update holds about six float32 copies of the rows it works on (the working
# copy, noise, the rounding dither and its temporaries): smaller chunks keep that to ~3 MB.
LOW_PRECISION_CHUNK_ELEMENTS = ROW_CHUNK_ELEMENTS // 8
LOW_PRECISION_UPDATE_COPIES = 6


@torch.no_grad()
def apply_zo_update_(
    target: ZoTarget,
    seeds_and_coefs: Sequence[tuple[int, float]],
    lr: float,
    weight_decay: float = 0.0,
    rows: dict[int, dict[str, torch.Tensor]] | None = None,
) -> None:
    """θ −= lr · (Σ_i c_i · z_i + wd · θ), z_i regenerated from seed_i one tensor at a time.

    `c_i` is the projected gradient already divided by the number of estimates it is averaged over
    (Q pairs times accumulated micro-batches), so this equals SGD on ĝ = Σ_i c_i z_i. A bf16
    tensor is updated in float32 and stochastically rounded back (see the module docstring).

    `rows` (row-sparse noise, see `ZoTarget.rows_seen`): z_i of a tensor named there is zero
    outside the rows seed_i's forwards looked up, so only those rows move, weight decay included
    (as sparse optimizers do).
    """
    if not seeds_and_coefs:
        return
    check_finite_update("a ZO projected gradient", [c for _, c in seeds_and_coefs])
    round_seed = tensor_seed(seeds_and_coefs[0][0], "stochastic rounding")
    sparse = {name for per_seed in (rows or {}).values() for name in per_seed}
    for name, param in target.named:
        if name in sparse:
            assert rows is not None
            _update_rows_(param, name, seeds_and_coefs, lr, weight_decay, rows, round_seed)
            continue
        rows = param.shape[0] if param.dim() else 1
        width = param[0].numel() if param.dim() else 1
        exact = param.dtype == compute_dtype(param.dtype)  # float32 or float64: no rounding
        # Embedding matrices (and every bf16 tensor, which needs a float32 working copy) are
        # walked in chunks of rows: (chunk, d) of noise at a time instead of (V, d).
        chunked = name in target.row_wise or not exact
        limit = ROW_CHUNK_ELEMENTS if exact else LOW_PRECISION_CHUNK_ELEMENTS
        chunk = max(1, limit // max(1, width)) if chunked else rows
        for start in range(0, rows, chunk):
            span = range(start, min(start + chunk, rows))
            block = param[span.start : span.stop] if param.dim() else param
            work = block if exact else block.float()
            if weight_decay:
                work.mul_(1.0 - lr * weight_decay)
            for seed, coef in seeds_and_coefs:
                work.add_(_noise_rows(param, seed, name, span, chunk == rows), alpha=-lr * coef)
            if not exact:
                dither = _noise_rows(param, round_seed, name, span, chunk == rows)
                block.copy_(_stochastic_round(work, dither, block.dtype))


def _update_rows_(
    param: torch.Tensor,
    name: str,
    seeds_and_coefs: Sequence[tuple[int, float]],
    lr: float,
    weight_decay: float,
    rows: dict[int, dict[str, torch.Tensor]],
    round_seed: int,
) -> None:
    """The row-sparse update of one (V, d) matrix: O(rows × d), never O(V × d)."""
    looked_up = [rows.get(seed, {}).get(name) for seed, _ in seeds_and_coefs]
    touched = torch.cat([r for r in looked_up if r is not None]).unique()  # (R,) sorted
    if touched.numel() == 0:
        return
    exact = param.dtype == compute_dtype(param.dtype)
    work = param[touched].to(compute_dtype(param.dtype))  # (R, d): a copy
    if weight_decay:
        work.mul_(1.0 - lr * weight_decay)
    for (seed, coef), seed_rows in zip(seeds_and_coefs, looked_up):
        if seed_rows is None:
            continue
        where = torch.searchsorted(touched, seed_rows)  # positions of this seed's rows in work
        z = row_noise(param, seed, name, seed_rows).to(work.dtype)  # (r, d)
        work.index_add_(0, where, z, alpha=-lr * coef)
    if not exact:
        work = _stochastic_round(work, row_noise(param, round_seed, name, touched), param.dtype)
    param.index_copy_(0, touched, work.to(param.dtype))


def _noise_rows(
    param: torch.Tensor, seed: int, name: str, rows: range, whole: bool
) -> torch.Tensor:
    """z of `rows` of `param` (all of it when `whole`), float32, shaped like those rows."""
    if whole:
        return noise_for(param, seed, name)
    # rows of z viewed as (rows, *param.shape[1:]); lean passes: the update holds a chunk of rows
    return row_noise(param, seed, name, rows, lean=True)


def _stochastic_round(x: torch.Tensor, dither: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float32) rounded to `dtype` (bf16) up or down with probability by proximity.

    bf16 is float32 with the low 16 bits of the pattern dropped. Adding a uniform integer in
    [0, 2¹⁶) to those bits before dropping them rounds the magnitude up with probability equal
    to the dropped fraction, so E[round(x)] = x. The uniform comes from a Gaussian through its
    own CDF (Φ(z) is uniform), so the dither is a pure function of (seed, name, element).
    """
    if dtype != torch.bfloat16:
        return x.to(dtype)
    # in place: with x and the dither, one int32 temporary is all the rounding adds
    uniform = torch.special.ndtr(dither, out=dither).mul_(65536.0).clamp_(0.0, 65535.0)
    bits = x.contiguous().view(torch.int32)
    bits.add_(uniform.to(torch.int32)).bitwise_and_(-65536)  # drop the low 16 bits
    return bits.view(torch.float32).to(dtype)  # exact: the low bits are zero
