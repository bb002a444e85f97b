"""Perturb-on-use, central differences and the seeded update.

MeZO perturbs θ in place (θ += εz, θ −= 2εz, θ += εz). In floating point that round trip does not
restore θ bit for bit, and it draws z three times per pair. Here the perturbation is applied *on
use*: while a `PerturbedForward` is active, a forward pre-hook on each module that owns trainable
parameters swaps in θ + scale·z for that module alone, and a forward hook swaps θ back. So

- θ itself is never modified by an estimate: restoring is exact by construction;
- the extra memory is one module's perturbed parameters at a time (at most the largest tensor,
  e.g. the embedding matrix), never a model-sized buffer;
- z is drawn twice per pair (for h⁺ and h⁻) instead of three times.

The update θ −= lr · Σ_i c_i z_i regenerates each z_i from its seed one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from hosl.zo.seeds import noise_for


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
        stash: dict[str, nn.Parameter] = {}

        def swap_in(mod: nn.Module, _args: object, owned=owned, stash=stash) -> None:
            for attr, name in owned:
                param = mod._parameters[attr]
                stash[attr] = param
                # one new tensor: z, scaled and shifted in place into θ + scale·z
                perturbed = noise_for(param, seed, name).mul_(scale).add_(param.detach())
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
        for seed, coef in seeds_and_coefs:
            param.add_(noise_for(param, seed, name), alpha=-lr * coef)
