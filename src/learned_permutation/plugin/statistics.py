"""Calibration statistics of the Linear inputs that a permutation site feeds.

The modifier needs, per consumer Linear, either the full input Hessian ``X^T X`` (per-layer
sites, where one layer's statistics fit in memory) or only its diagonal ``sum_t x_tj^2``
(the residual site, which spans every layer of the model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["InputStatistics", "check_finite_statistics"]


class InputStatistics:
    """Running sums of Linear inputs in fp32, keyed by module.

    ``full=True`` keeps ``X^T X`` (c x c); ``full=False`` keeps only ``diag(X^T X)``.
    """

    def __init__(self, full: bool):
        self.full = full
        self.sums: dict[nn.Module, torch.Tensor] = {}

    def accumulate(self, module: nn.Module, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        update = x.T @ x if self.full else x.square().sum(dim=0)
        if module in self.sums:
            self.sums[module] += update
        else:
            self.sums[module] = update

    def hook(self, module: nn.Module, args: tuple, _output) -> None:
        """Forward hook: the first positional argument is the Linear's input."""
        self.accumulate(module, args[0])

    def permute_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        """Follow a fold that re-ordered ``module``'s input columns to ``index`` (no-op if unseen)."""
        if module in self.sums:
            stat = self.sums[module]
            index = index.to(stat.device)
            self.sums[module] = stat[index][:, index] if self.full else stat[index]

    def subset(self, modules: Iterable[nn.Module]) -> dict[nn.Module, torch.Tensor]:
        """The statistics of ``modules`` that were seen (kept)."""
        return {module: self.sums[module] for module in modules if module in self.sums}

    def pop(self, modules: Iterable[nn.Module]) -> dict[nn.Module, torch.Tensor]:
        """Hand over (and forget) the statistics of ``modules`` that were seen."""
        taken = {}
        for module in modules:
            if module in self.sums:
                taken[module] = self.sums.pop(module)
        return taken


def check_finite_statistics(stats: dict[nn.Module, torch.Tensor], names: dict[nn.Module, str]):
    """Refuse NaN/inf statistics before they silently pick a meaningless permutation."""
    for module, value in stats.items():
        if not torch.isfinite(value).all():
            raise ValueError(
                f"Calibration statistics of {names.get(module, module)} contain NaN or inf. "
                "The model produces non-finite activations on the calibration data: check the "
                "model's dtype (calibrate in float32 or bfloat16, not float16) and the data."
            )
