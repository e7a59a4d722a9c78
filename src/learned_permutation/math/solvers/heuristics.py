"""The control and RIA's channel-permutation heuristic (sort, deal round-robin, refine by linear assignment)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..objectives import SiteProblem, sampled_score_rows
from ..threads import independent_map
from .layout import channel_domains, group_windows
from .retained import chunk_elements, insertion_values, slot_statistics


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
    Windows are disjoint, so each slot is re-assigned in every window before the next slot, equal-sized
    windows together as far as ``chunk_elements`` allows (one on a CPU, several on a GPU: fewer
    launches and host round trips) and their assignments solved in parallel threads; on a CPU the
    windows are shared among the caller's threads (``threads.independent_map``).
    """
    generator = torch.Generator().manual_seed(seed)
    perm = deal_by_importance(problem, block_size)
    scores = sampled_score_rows(problem, rows, generator)
    windows = group_windows(channel_domains(problem.channels, block_size), problem.m, lsa_groups * problem.m)
    together = max(1, chunk_elements(problem.device) // (scores.shape[0] * lsa_groups * (problem.m - 1)))  # one slot's others
    batches = [torch.stack(batch).to(problem.device) for batch in _equal_sized_batches(windows, together)]
    for slot in range(problem.m):
        def reassign(batch: torch.Tensor, slot: int = slot) -> None:
            perm[batch] = _reassign_slot(scores, perm[batch], problem.n, problem.m, slot)

        independent_map(reassign, batches, problem.device)  # disjoint windows: any order, any thread
    return perm


def _equal_sized_batches(windows: list[torch.Tensor], most: int) -> list[list[torch.Tensor]]:
    """Consecutive windows of one size, at most ``most`` per batch."""
    batches: list[list[torch.Tensor]] = []
    for window in windows:
        if batches and len(batches[-1]) < most and len(batches[-1][0]) == len(window):
            batches[-1].append(window)
        else:
            batches.append([window])
    return batches


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


def _reassign_slot(scores: torch.Tensor, window_perms: torch.Tensor, n: int, m: int, slot: int) -> torch.Tensor:
    """``window_perms`` ``[windows, channels]`` with the channels in ``slot`` re-assigned to the groups
    of their window by a linear assignment on the retained score."""
    windows = window_perms.shape[0]
    grouped = scores[:, window_perms].reshape(scores.shape[0], windows, -1, m).transpose(0, 1)  # [windows, rows, groups, M]
    slot_top, slot_threshold = slot_statistics(grouped, n, [slot])
    values = insertion_values(slot_top[..., 0], slot_threshold[..., 0], grouped[..., slot]).cpu().double().numpy()
    sources = torch.as_tensor(np.stack(_assignments(values)), device=window_perms.device)
    arranged = window_perms.reshape(windows, -1, m).clone()
    arranged[..., slot] = arranged[..., slot].gather(1, sources)
    return arranged.reshape(windows, -1)


def _assignments(values: np.ndarray) -> list[np.ndarray]:
    """For each ``[groups, groups]`` matrix, the column each row takes in the assignment of highest total."""
    def solve(matrix: np.ndarray) -> np.ndarray:
        return linear_sum_assignment(matrix, maximize=True)[1]

    if len(values) == 1:
        return [solve(values[0])]
    with ThreadPoolExecutor(max_workers=len(values)) as pool:  # scipy's solver runs without the GIL
        return list(pool.map(solve, values))
