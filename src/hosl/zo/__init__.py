"""Zeroth-order engine: seeded perturbations applied on use, central differences, updates."""

from hosl.zo.engine import PerturbedForward, ZoTarget, apply_zo_update_
from hosl.zo.estimate import ZoRecords, directional_derivative, pair_losses, projected_gradient
from hosl.zo.seeds import noise_for, perturbation_seed, row_noise, tensor_seed

__all__ = [
    "PerturbedForward",
    "ZoRecords",
    "ZoTarget",
    "apply_zo_update_",
    "directional_derivative",
    "noise_for",
    "pair_losses",
    "perturbation_seed",
    "projected_gradient",
    "row_noise",
    "tensor_seed",
]
