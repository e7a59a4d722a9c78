"""The residual site's solver input, gathered one layer at a time in bounded memory.

The residual permutation is read by every q/k/v/gate/up_proj of every layer, so its exact objective
needs all of their weights: about 15 GB in fp32 for a 7B model. Instead each reader contributes a
seeded random sample of its weight rows (with its input energy), at one rate for all readers chosen
so that the whole sample holds as many rows as one decoder layer's readers. Rows enter the objective
independently (the N:M mask is per row), so the sample's objective is an unbiased estimate of the
full one (up to a constant factor), and memory stays one layer of readers whatever the depth.
"""

from __future__ import annotations

import torch

from learned_permutation.math.objectives import Consumer

__all__ = ["ReaderRowSample"]


class ReaderRowSample:
    """Sampled weight rows of the residual readers, kept in fp32 on ``device`` (the execution device, where
    the residual solvers then run): each reader keeps ``1 / num_layers`` of its rows (at least one), so
    the sample is about one layer's readers."""

    def __init__(self, num_layers: int, seed: int, device: torch.device | str = "cpu"):
        self.rate = 1.0 / max(1, num_layers)
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.consumers: list[Consumer] = []

    def add(self, weight: torch.Tensor, act_sq: torch.Tensor) -> None:
        """Sample rows of one reader's weight (read while its layer is onloaded)."""
        rows = weight.shape[0]
        count = max(1, round(rows * self.rate))
        chosen = torch.randperm(rows, generator=self.generator)[:count].sort().values
        sampled = weight.detach()[chosen.to(weight.device)].float().to(self.device)
        self.consumers.append(Consumer(weight=sampled, act_sq=act_sq.detach().float().to(self.device)))

    @property
    def sampled_rows(self) -> int:
        return sum(consumer.weight.shape[0] for consumer in self.consumers)
