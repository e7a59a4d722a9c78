"""The residual site's solver input, gathered one layer at a time in bounded memory.

The residual permutation is read by every q/k/v/gate/up_proj of every layer, so its exact objective
needs all of their weights: about 15 GB in fp32 for a 7B model. Instead each reader contributes a
seeded random sample of its weight rows (with its input energy), at one rate for all readers chosen
so that the whole sample holds as many rows as one decoder layer's readers, and at most
``RESIDUAL_SAMPLE_ROWS``. Rows enter the objective independently (the N:M mask is per row), so the
sample's objective is an unbiased estimate of the full one (up to a constant factor), and memory stays
within one layer of readers whatever the depth, and a fixed number of rows whatever the width.

With each row's loss sensitivity at hand (``plugin/sensitivity.py``), rows are weighted by it instead
(scaled by its square root, so that a row's reconstruction error counts in proportion to the loss it
costs) and the sample keeps the rows of largest weighted output energy, as many as a random one would,
so that its rows go to the errors the loss feels most rather than to every row alike.
"""

from __future__ import annotations

import torch

from learned_permutation.math.objectives import Consumer

__all__ = ["ReaderRowSample", "RESIDUAL_SAMPLE_ROWS"]

# Four times the score rows the residual solvers draw their gains from (``rows=1024``), so their running
# totals and the report's objective see more rows than the gains. The solve holds three copies (weight
# rows, scores, ``greedy``'s channel-major scores): 96 MiB in fp32 at hidden size 2048. It binds from about
# Llama-3.2-1B's width (19,456 reader rows per layer); SmolLM2-135M's layer has 4,032.
RESIDUAL_SAMPLE_ROWS = 4096


class ReaderRowSample:
    """Sampled weight rows of the residual readers, kept in fp32 on ``device`` (the execution device, where
    the residual solvers then run): each reader keeps the same share of its rows (at least one),
    ``1 / num_layers`` or less, so that the sample is about one layer's readers and at most about
    ``max_rows`` (``total_rows``: the rows of every reader together)."""

    def __init__(self, num_layers: int, total_rows: int, seed: int, device: torch.device | str = "cpu",
                 max_rows: int = RESIDUAL_SAMPLE_ROWS):
        self.rate = min(1.0 / max(1, num_layers), max_rows / max(1, total_rows))
        self.capacity = max(1, round(self.rate * total_rows))
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.consumers: list[Consumer] = []
        self._energies: list[torch.Tensor] = []  # weighted rows' output energies, per consumer (kept rows only)

    def add(self, weight: torch.Tensor, act_sq: torch.Tensor, sensitivity: torch.Tensor | None = None) -> None:
        """Sample rows of one reader's weight (read while its layer is onloaded); with ``sensitivity`` (one
        value per row), weighted rows, keeping the heaviest ``capacity`` rows of all readers so far."""
        if sensitivity is not None:
            self._keep_heaviest(weight, act_sq, sensitivity)
            return
        rows = weight.shape[0]
        count = max(1, round(rows * self.rate))
        chosen = torch.randperm(rows, generator=self.generator)[:count].sort().values
        sampled = weight.detach()[chosen.to(weight.device)].float().to(self.device)
        self.consumers.append(Consumer(weight=sampled, act_sq=act_sq.detach().float().to(self.device)))

    @property
    def sampled_rows(self) -> int:
        return sum(consumer.weight.shape[0] for consumer in self.consumers)

    def _keep_heaviest(self, weight: torch.Tensor, act_sq: torch.Tensor, sensitivity: torch.Tensor) -> None:
        reader = Consumer(weight=weight.detach().float().to(self.device), act_sq=act_sq.detach().float().to(self.device))
        reader = reader.weighted_rows(sensitivity)
        self.consumers.append(reader)
        self._energies.append(reader.weight.square() @ reader.act_sq)
        every = torch.cat(self._energies)
        if every.numel() <= self.capacity:
            return
        threshold = every.topk(self.capacity).values[-1]
        kept = [(Consumer(weight=consumer.weight[energy >= threshold], act_sq=consumer.act_sq), energy[energy >= threshold])
                for consumer, energy in zip(self.consumers, self._energies)]
        kept = [(consumer, energy) for consumer, energy in kept if consumer.weight.shape[0]]
        self.consumers, self._energies = [c for c, _ in kept], [e for _, e in kept]
