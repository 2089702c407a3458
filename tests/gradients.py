"""Gradient checks shared by the network and block tests."""
import torch
from torch import nn


def parameters_without_gradient(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters that the last backward left without a gradient (None or all zeros).

    Fails, naming them, where a gradient holds NaN or ±inf: ``NaN != 0`` is true, so without this a NaN
    gradient (e.g. from NaN loss weights) would count as one that reached its parameter."""
    nonfinite = [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not nonfinite, f'non-finite gradients: {nonfinite}'
    return [n for n, p in module.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
