"""Which channel positions a solver may mix: domains (restricted blocks) and windows inside them."""

from __future__ import annotations

import torch


def channel_domains(channels: int, block_size: int | None) -> list[range]:
    """Position ranges a permutation may mix: the whole site, or each contiguous block."""
    size = block_size or channels
    return [range(start, start + size) for start in range(0, channels, size)]


def group_windows(domains: list[range], m: int, window: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Position index sets of at most ``window`` channels made of whole M-groups, never crossing a domain.

    With a generator the groups of each domain are visited in a random order, so successive sweeps
    put different groups side by side (group order does not change any objective).
    """
    windows = []
    groups_per_window = max(1, window // m)
    for domain in domains:
        groups = torch.arange(domain.start, domain.stop, m)
        if generator is not None:
            groups = groups[torch.randperm(groups.numel(), generator=generator)]
        for start in range(0, groups.numel(), groups_per_window):
            chosen = groups[start : start + groups_per_window]
            windows.append((chosen[:, None] + torch.arange(m)).reshape(-1))
    return windows
