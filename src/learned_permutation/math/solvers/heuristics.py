"""The control and RIA's channel-permutation heuristic (sort, deal round-robin, refine by linear assignment)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from ..objectives import SiteProblem, sampled_score_rows
from .layout import channel_domains, group_windows
from .retained import insertion_values, slot_statistics


def solve_identity(problem: SiteProblem, block_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """Keep the original order: the control every other solver is measured against.

    ``seed`` is accepted (and unused) so every solver takes the same common knobs."""
    return torch.arange(problem.channels, device=problem.device)


def solve_ria(
    problem: SiteProblem,
    block_size: int | None = None,
    *,
    rows: int | None = 1024,
    lsa_groups: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """RIA-style permutation maximising the retained score.

    Channels are sorted by total importance and dealt zig-zag over the M-groups (so every group
    gets one channel of each importance quantile); then, slot by slot, the channels of one slot are
    re-assigned to groups by a linear assignment on the retained score. ``rows`` subsamples score
    rows for the assignment; ``lsa_groups`` bounds each assignment problem (windows of groups).
    """
    generator = torch.Generator().manual_seed(seed)
    perm = deal_by_importance(problem, block_size)
    scores = sampled_score_rows(problem, rows, generator)
    for window in group_windows(channel_domains(problem.channels, block_size), problem.m, lsa_groups * problem.m):
        for slot in range(problem.m):
            perm[window] = _reassign_slot(scores, perm[window], problem.n, problem.m, slot)
    return perm


def deal_by_importance(problem: SiteProblem, block_size: int | None) -> torch.Tensor:
    """Zig-zag dealing inside every block: rank k goes to slot k // G of group k % G (reversed on odd passes)."""
    importance = sum(consumer.score.sum(dim=0) for consumer in problem.consumers)
    domain = block_size or problem.channels
    blocks = problem.channels // domain
    groups = domain // problem.m
    ranked = importance.reshape(blocks, domain).argsort(dim=1, descending=True, stable=True)
    rank = torch.arange(domain, device=problem.device)
    passes, index = rank // groups, rank % groups
    group = torch.where(passes % 2 == 0, index, groups - 1 - index)
    position = group * problem.m + passes
    perm = torch.empty(blocks, domain, dtype=torch.long, device=problem.device)
    perm[:, position] = ranked + (torch.arange(blocks, device=problem.device) * domain)[:, None]
    return perm.reshape(-1)


def _reassign_slot(scores: torch.Tensor, window_perm: torch.Tensor, n: int, m: int, slot: int) -> torch.Tensor:
    grouped = scores[:, window_perm].reshape(scores.shape[0], -1, m)
    slot_top, slot_threshold = slot_statistics(grouped, n)
    values = insertion_values(slot_top[..., slot], slot_threshold[..., slot], grouped[..., slot])
    _, source = linear_sum_assignment(values.cpu().double().numpy(), maximize=True)
    arranged = window_perm.reshape(-1, m).clone()
    arranged[:, slot] = arranged[torch.as_tensor(source, device=window_perm.device), slot]
    return arranged.reshape(-1)
