"""Apex-style channel swaps between M-groups, maximising the retained pruning score.

This is the classic baseline: it sees only the (diagonal) retained score, not the Hessian's
off-diagonal terms. Gains of every candidate swap in a window are computed at once on a row
sample; each chosen swap is then re-checked on all rows, so the retained score never decreases.
The re-check reads channel-major scores and a cached top-N sum per group, so it touches only the
two groups of each swap.
"""

from __future__ import annotations

import torch

from ..objectives import SiteProblem, sampled_score_rows
from .layout import channel_domains, group_windows
from .retained import chunk_elements, group_retained, insertion_values, slot_statistics


def solve_greedy(
    problem: SiteProblem,
    block_size: int | None = None,
    *,
    init: torch.Tensor | None = None,
    window: int = 256,
    rows: int | None = 1024,
    sweeps: int = 3,
    max_iters: int = 100,
    seed: int = 0,
) -> torch.Tensor:
    """Swap channels between groups while the retained score improves.

    ``window``: channels whose pairwise swaps are scored together (whole groups; groups are
    reshuffled into new windows every sweep); ``rows``: score rows sampled for the gains;
    ``sweeps``: passes over all windows (stops early when a sweep changes nothing);
    ``max_iters``: swap rounds per window.
    """
    generator = torch.Generator().manual_seed(seed)
    perm = torch.arange(problem.channels, device=problem.device) if init is None else init.clone().to(problem.device)
    scores = sampled_score_rows(problem, rows, generator)
    retained = GroupRetained(problem, perm)
    domains = channel_domains(problem.channels, block_size)
    for _ in range(sweeps):
        changed = False
        for window_positions in group_windows(domains, problem.m, window, generator):
            window_positions = window_positions.to(problem.device)
            changed |= _improve_window(problem, scores, retained, perm, window_positions, max_iters)
        if not changed or all(len(domain) <= window for domain in domains):
            break  # converged, or every domain fits one window so another sweep sees the same swaps
    return perm


def _improve_window(
    problem: SiteProblem, scores: torch.Tensor, retained: GroupRetained, perm: torch.Tensor, positions: torch.Tensor,
    max_iters: int,
) -> bool:
    """Swap rounds on one window until none improves (at most ``max_iters``); True if any swap was made."""
    window = WindowValues(problem, scores, perm, positions)
    changed = False
    for _ in range(max_iters):
        swapped = _swap_round(problem, window, retained, perm, positions)
        if swapped is None:
            break
        changed = True
        window.update(perm, swapped)
    return changed


def _swap_round(
    problem: SiteProblem, window: WindowValues, retained: GroupRetained, perm: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor | None:
    """Apply the best disjoint improving swaps of one window in place; the window-local positions they
    moved, or None when none improves."""
    m = problem.m
    gain = window.values + window.values.T - window.current[:, None] - window.current[None, :]
    group_of = torch.arange(gain.shape[0], device=gain.device) // m
    gain.masked_fill_(group_of[:, None] == group_of[None, :], -torch.inf)
    pairs = disjoint_best_pairs(gain, gain.shape[0] // m, m)
    if not pairs:
        return None
    local = torch.tensor(pairs, device=positions.device)  # [swaps, 2] window-local positions
    first, second = positions[local[:, 0]], positions[local[:, 1]]
    candidate = perm.clone()
    candidate[first], candidate[second] = perm[second], perm[first]
    touched = torch.stack([first // m, second // m], dim=1)  # [swaps, 2] group indices
    after = retained.of_groups(candidate.reshape(-1, m)[touched.reshape(-1)]).reshape(-1, 2)
    improves = (after - retained.values[touched]).sum(dim=1) > 0
    if not bool(improves.any()):
        return None
    perm[first[improves]], perm[second[improves]] = candidate[first[improves]], candidate[second[improves]]
    retained.values[touched[improves]] = after[improves]
    return local[improves].reshape(-1)


class WindowValues:
    """The sampled rows' retained score of every slot of a window with every channel of the window put in
    it (``values[slot, position]``) and of each slot's group as it stands (``current``). After a round,
    only the groups it touched and the columns of the channels it moved are recomputed: late rounds
    move a few channels, so a round costs a few rows and columns of the matrix instead of all of it."""

    def __init__(self, problem: SiteProblem, scores: torch.Tensor, perm: torch.Tensor, positions: torch.Tensor):
        self.n, self.m, self.scores, self.positions = problem.n, problem.m, scores, positions
        self.flat = scores[:, perm[positions]]  # [rows, window]: the window's channels in their slots
        grouped = self._grouped()
        self.slot_top, self.slot_threshold = (part.flatten(1) for part in slot_statistics(grouped, self.n))
        self.values = insertion_values(self.slot_top, self.slot_threshold, self.flat)
        self.current = group_retained(grouped, self.n).repeat_interleave(self.m)

    def _grouped(self) -> torch.Tensor:
        return self.flat.reshape(self.flat.shape[0], -1, self.m)

    def update(self, perm: torch.Tensor, moved: torch.Tensor) -> None:
        """Refresh after the channels at window-local positions ``moved`` changed."""
        self.flat[:, moved] = self.scores[:, perm[self.positions[moved]]]
        grouped = self._grouped()
        groups = torch.unique(moved // self.m)
        slots = (groups[:, None] * self.m + torch.arange(self.m, device=groups.device)).reshape(-1)
        top, threshold = slot_statistics(grouped[:, groups], self.n)
        self.slot_top[:, slots], self.slot_threshold[:, slots] = top.flatten(1), threshold.flatten(1)
        flat = self.flat
        self.values[slots] = insertion_values(self.slot_top[:, slots], self.slot_threshold[:, slots], flat)
        others = torch.ones(self.values.shape[0], dtype=torch.bool, device=slots.device)
        others[slots] = False
        if bool(others.any()):  # the untouched slots only see the moved channels change
            self.values[others.nonzero()[:, 0][:, None], moved[None, :]] = insertion_values(
                self.slot_top[:, others], self.slot_threshold[:, others], flat[:, moved])
        self.current[slots] = group_retained(grouped[:, groups], self.n).repeat_interleave(self.m)


def disjoint_best_pairs(gain: torch.Tensor, groups: int, m: int) -> list[tuple[int, int]]:
    """Greedily pick the best positive swap, block both groups, repeat (at most groups/2 picks).

    The picks run on the host: one ``[groups, groups]`` copy instead of a device sync per pick."""
    per_pair = gain.reshape(groups, m, groups, m).permute(0, 2, 1, 3).reshape(groups, groups, m * m)
    best, where = (part.cpu() for part in per_pair.max(dim=-1))
    pairs = []
    for _ in range(groups // 2):
        flat = int(best.argmax())
        group_a, group_b = divmod(flat, groups)
        if not best[group_a, group_b] > 0:
            break
        slot_a, slot_b = divmod(int(where[group_a, group_b]), m)
        pairs.append((group_a * m + slot_a, group_b * m + slot_b))
        best[[group_a, group_b], :] = -torch.inf
        best[:, [group_a, group_b]] = -torch.inf
    return pairs


class GroupRetained:
    """Top-N score sum of every M-group over all rows of all consumers, kept current under swaps."""

    def __init__(self, problem: SiteProblem, perm: torch.Tensor) -> None:
        self.n, self.m = problem.n, problem.m
        self.columns = [consumer.score.T.contiguous() for consumer in problem.consumers]  # [channels, rows]
        self.values = self.of_groups(perm.reshape(-1, self.m))

    def of_groups(self, members: torch.Tensor) -> torch.Tensor:
        """``[groups]`` float64 retained score of groups given by their channels ``[groups, M]``."""
        total = torch.zeros(members.shape[0], dtype=torch.float64, device=members.device)
        for columns in self.columns:
            step = max(1, chunk_elements(columns.device) // (self.m * columns.shape[1]))
            for start in range(0, members.shape[0], step):
                part = members[start : start + step]
                grouped = columns[part.reshape(-1)].reshape(*part.shape, -1)  # [groups, M, rows]
                total[start : start + step] += grouped.topk(self.n, dim=1, sorted=False).values.sum(dim=(1, 2)).double()
        return total
