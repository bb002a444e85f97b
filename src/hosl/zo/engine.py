"""Perturb-on-use, central differences and the seeded update.

MeZO perturbs θ in place (θ += εz, θ −= 2εz, θ += εz). In floating point that round trip does not
restore θ bit for bit, and it draws z three times per pair. Here the perturbation is applied *on
use*: while a `PerturbedForward` is active, a forward pre-hook on each module that owns trainable
parameters swaps in θ + scale·z for that module alone, and a forward hook swaps θ back. So

- θ itself is never modified by an estimate: restoring is exact by construction;
- the extra memory is one module's perturbed parameters at a time, never a model-sized buffer;
- z is drawn twice per pair (for h⁺ and h⁻) instead of three times.

Embedding matrices are the exception that matters (V × d, the largest tensor of a small model):
their noise is drawn row by row (`row_noise`), so a plain `nn.Embedding` is perturbed by adding
scale·z[ids] to its output — only the rows the batch looks up are generated, (B·L × d) instead
of (V × d) — and the update walks the matrix in chunks of rows. The direction z is the same
Gaussian as before; only where it is drawn from changed.

The update θ −= lr · Σ_i c_i z_i regenerates each z_i from its seed one tensor (or one chunk of
rows) at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from hosl.zo.seeds import ROW_CHUNK_ELEMENTS, noise_for, row_noise


class ZoTarget:
    """The trainable parameters of a module, each under one canonical name.

    A parameter shared by two modules (a tied embedding and head) gets one name, so both uses see
    the same noise and the update touches it once.
    """

    def __init__(self, module: nn.Module, prefix: str = "") -> None:
        self.module = module
        # named_parameters() de-duplicates shared tensors: the first name is the canonical one.
        self.named: list[tuple[str, nn.Parameter]] = [
            (prefix + name, p) for name, p in module.named_parameters() if p.requires_grad
        ]
        self._name_of = {id(p): name for name, p in self.named}
        # Names of embedding matrices (also when a head shares them): their noise is row-wise.
        self.row_wise: set[str] = {
            self._name_of[id(m.weight)]
            for m in module.modules()
            if isinstance(m, nn.Embedding) and id(m.weight) in self._name_of
        }

    def noise(self, name: str, param: torch.Tensor, seed: int) -> torch.Tensor:
        """The whole z of one named tensor under `seed`."""
        return noise_for(param, seed, name, row_wise=name in self.row_wise)

    def __len__(self) -> int:
        return len(self.named)

    def numel(self) -> int:
        return sum(p.numel() for _, p in self.named)

    def owners(self) -> Iterator[tuple[nn.Module, list[tuple[str, str]]]]:
        """Each module that directly owns trainable parameters, with (attribute, canonical name)."""
        for module in self.module.modules():
            owned = [
                (attr, self._name_of[id(p)])
                for attr, p in module.named_parameters(recurse=False)
                if id(p) in self._name_of
            ]
            if owned:
                yield module, owned


@contextmanager
def PerturbedForward(target: ZoTarget, seed: int, scale: float) -> Iterator[None]:  # noqa: N802
    """While active, every forward through `target.module` sees θ + scale·z(seed) for its params."""
    handles = []
    for module, owned in target.owners():
        if _looks_up_rows(module, owned, target):
            handles.append(module.register_forward_hook(_add_row_noise(owned[0][1], seed, scale)))
            continue
        stash: dict[str, nn.Parameter] = {}

        def swap_in(mod: nn.Module, _args: object, owned=owned, stash=stash) -> None:
            for attr, name in owned:
                param = mod._parameters[attr]
                stash[attr] = param
                # one new tensor: z, scaled and shifted in place into θ + scale·z
                perturbed = target.noise(name, param, seed).mul_(scale).add_(param.detach())
                mod._parameters[attr] = perturbed  # a plain tensor, only for this call

        def swap_out(mod: nn.Module, _args: object, _out: object, owned=owned, stash=stash) -> None:
            for attr, _ in owned:
                mod._parameters[attr] = stash.pop(attr)

        handles.append(module.register_forward_pre_hook(swap_in))
        handles.append(module.register_forward_hook(swap_out, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _looks_up_rows(module: nn.Module, owned: list[tuple[str, str]], target: ZoTarget) -> bool:
    """A plain nn.Embedding (no max_norm renormalisation) whose weight's noise is row-wise."""
    return (
        type(module) is nn.Embedding  # subclasses (OPT's positions) may remap their input
        and module.max_norm is None
        and [attr for attr, _ in owned] == ["weight"]
        and owned[0][1] in target.row_wise
    )


def _add_row_noise(name: str, seed: int, scale: float):  # noqa: ANN202
    """Forward hook: (θ + scale·z)[ids] computed as θ[ids] + scale·z[ids], z drawn for ids only."""

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        ids = args[0]                                                # (B, L) token ids
        rows, where = torch.unique(ids, return_inverse=True)         # (U,), (B, L)
        z = row_noise(mod.weight, seed, name, rows).mul_(scale)      # (U, d)
        return out + z[where]                                        # (B, L, d)

    return hook


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """Central difference along z: g = (L(θ+εz) − L(θ−εz)) / 2ε."""
    return (loss_plus - loss_minus) / (2.0 * eps)


@torch.no_grad()
def apply_zo_update_(
    target: ZoTarget,
    seeds_and_coefs: Sequence[tuple[int, float]],
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """θ −= lr · (Σ_i c_i · z_i + wd · θ), z_i regenerated from seed_i one tensor at a time.

    `c_i` is the projected gradient already divided by the number of estimates it is averaged over
    (Q pairs times accumulated micro-batches), so this equals SGD on ĝ = Σ_i c_i z_i.
    """
    for name, param in target.named:
        if weight_decay:
            param.mul_(1.0 - lr * weight_decay)
        if name in target.row_wise:
            # (chunk, d) of noise at a time instead of (V, d)
            chunk = max(1, ROW_CHUNK_ELEMENTS // max(1, param[0].numel()))
            for start in range(0, param.shape[0], chunk):
                rows = range(start, min(start + chunk, param.shape[0]))
                block = param[start:rows.stop]
                for seed, coef in seeds_and_coefs:
                    block.add_(row_noise(param, seed, name, rows), alpha=-lr * coef)
            continue
        for seed, coef in seeds_and_coefs:
            param.add_(noise_for(param, seed, name), alpha=-lr * coef)
