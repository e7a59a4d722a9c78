"""Apex-style channel swaps between M-groups, maximising the retained pruning score.

This is the classic baseline: it sees only the (diagonal) retained score, not the Hessian's
off-diagonal terms. Gains of every candidate swap in a window are computed at once on a row
sample; each chosen swap is then re-checked on all rows, so the retained score never decreases.
The re-check reads channel-major scores and a cached top-N sum per group, so it touches only the
two groups of each swap. Windows are disjoint, so several can advance in lockstep (one swap round
for all of them) with the same result: on an accelerator that turns the sum of their rounds into
the most any one needs (``lockstep_windows``); on a CPU the windows are shared among the caller's
threads instead (``threads.independent_map``).
"""

from __future__ import annotations

import torch

from ..objectives import SiteProblem, sampled_score_rows
from ..threads import independent_map
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
    lockstep: int | None = None,
) -> torch.Tensor:
    """Swap channels between groups while the retained score improves.

    ``window``: channels whose pairwise swaps are scored together (whole groups; groups are
    reshuffled into new windows every sweep); ``rows``: score rows sampled for the gains;
    ``sweeps``: passes over all windows (stops early when a sweep changes nothing);
    ``max_iters``: swap rounds per window; ``lockstep``: windows improved together (default
    ``lockstep_windows(device)``). Windows are disjoint, so the result does not depend on it.
    """
    if lockstep is not None and lockstep < 1:
        raise ValueError(f"greedy: lockstep must be a positive number of windows, got {lockstep}")
    generator = torch.Generator().manual_seed(seed)
    perm = torch.arange(problem.channels, device=problem.device) if init is None else init.clone().to(problem.device)
    scores = sampled_score_rows(problem, rows, generator)
    retained = GroupRetained(problem, perm)
    domains = channel_domains(problem.channels, block_size)
    together = lockstep or lockstep_windows(problem.device)
    for _ in range(sweeps):
        batches = _batches(group_windows(domains, problem.m, window, generator), together)
        changed = any(independent_map(  # disjoint windows: the same swaps in any order, on any thread
            lambda batch: _improve_windows(problem, scores, retained, perm, batch.to(problem.device), max_iters),
            batches, problem.device))
        if not changed or all(len(domain) <= window for domain in domains):
            break  # converged, or every domain fits one window so another sweep sees the same swaps
    return perm


def lockstep_windows(device: torch.device | str) -> int:
    """One window at a time on CPU (its work stays in cache); on an accelerator every window of a sweep
    at once, so the sequential swap rounds (a few launches and a host round trip each) are the most any
    one window needs instead of their sum over the windows."""
    return 1 if torch.device(device).type == "cpu" else 1 << 30


def _batches(windows: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """``[windows, window]`` stacks of at most ``size`` consecutive windows of equal length."""
    batches, run = [], []
    for positions in windows:
        if run and (len(run) == size or len(run[0]) != len(positions)):
            batches.append(torch.stack(run))
            run = []
        run.append(positions)
    return batches + ([torch.stack(run)] if run else [])


def _improve_windows(
    problem: SiteProblem, scores: torch.Tensor, retained: GroupRetained, perm: torch.Tensor, positions: torch.Tensor,
    max_iters: int,
) -> bool:
    """Swap rounds on windows ``positions`` ``[windows, window]`` until none improves in a window (then it
    leaves the batch; at most ``max_iters`` rounds); True if any swap was made."""
    batch = WindowValues(problem, scores, perm, positions)
    changed = False
    for _ in range(max_iters):
        swapped = _swap_round(problem, batch, retained, perm)
        if swapped is None:
            break
        changed = True
        batch.update(perm, *swapped)
    return changed


def _swap_round(
    problem: SiteProblem, batch: WindowValues, retained: GroupRetained, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Apply the best disjoint improving swaps of every window in place; the (window, window-local
    position) pairs they moved, or None when no window improves."""
    m, positions = problem.m, batch.positions
    gain = batch.values + batch.values.transpose(1, 2) - batch.current[:, :, None] - batch.current[:, None, :]
    group_of = torch.arange(gain.shape[-1], device=gain.device) // m
    gain.masked_fill_(group_of[:, None] == group_of[None, :], -torch.inf)
    pairs = disjoint_best_pairs(gain, gain.shape[-1] // m, m).to(positions.device)  # [swaps, 3] window, a, c
    if not len(pairs):
        return None
    windows, local = pairs[:, 0], pairs[:, 1:]
    first, second = positions[windows, local[:, 0]], positions[windows, local[:, 1]]
    candidate = perm.clone()
    candidate[first], candidate[second] = perm[second], perm[first]
    touched = torch.stack([first // m, second // m], dim=1)  # [swaps, 2] group indices
    after = retained.of_groups(candidate.reshape(-1, m)[touched.reshape(-1)]).reshape(-1, 2)
    improves = (after - retained.values[touched]).sum(dim=1) > 0
    if not bool(improves.any()):
        return None
    perm[first[improves]], perm[second[improves]] = candidate[first[improves]], candidate[second[improves]]
    retained.values[touched[improves]] = after[improves]
    return windows[improves].repeat_interleave(2), local[improves].reshape(-1)


class WindowValues:
    """For each window of a batch, the sampled rows' retained score of every slot with every channel of the
    window put in it (``values[window, slot, position]``) and of each slot's group as it stands
    (``current``). After a round, windows without a swap leave the batch, and only the groups a round
    touched and the columns of the channels it moved are recomputed: late rounds move a few channels, so
    a round costs a few rows and columns of each matrix instead of all of it."""

    def __init__(self, problem: SiteProblem, scores: torch.Tensor, perm: torch.Tensor, positions: torch.Tensor):
        self.n, self.m, self.scores, self.positions = problem.n, problem.m, scores, positions
        self.flat = scores[:, perm[positions]].permute(1, 0, 2).contiguous()  # [windows, rows, window]
        grouped = self._grouped()
        self.slot_top, self.slot_threshold = (part.flatten(2) for part in slot_statistics(grouped, self.n))
        self.values = insertion_values(self.slot_top, self.slot_threshold, self.flat)
        self.current = group_retained(grouped, self.n).repeat_interleave(self.m, dim=-1)

    def _grouped(self) -> torch.Tensor:
        return self.flat.unflatten(-1, (-1, self.m))  # [windows, rows, groups, M]

    def update(self, perm: torch.Tensor, windows: torch.Tensor, moved: torch.Tensor) -> None:
        """Refresh after the channels at window-local positions ``moved`` of batch windows ``windows``
        changed; windows not named leave the batch."""
        kept, windows = torch.unique(windows, return_inverse=True)
        if len(kept) < len(self.positions):
            for name in ("positions", "flat", "slot_top", "slot_threshold", "values", "current"):
                setattr(self, name, getattr(self, name)[kept])
        count, size = len(kept), self.flat.shape[-1]
        batch = torch.arange(count, device=moved.device)[:, None]
        moved = _padded(windows, moved, count)  # [windows, most moved]
        self.flat[batch, :, moved] = self.scores[:, perm[self.positions[batch, moved]]].permute(1, 2, 0)
        key = torch.unique(batch * size + moved // self.m)  # distinct (window, group) pairs
        groups = _padded(key // size, key % size, count)  # [windows, most touched groups]
        slots = (groups[..., None] * self.m + torch.arange(self.m, device=groups.device)).flatten(1)
        untouched = torch.ones(count, size, dtype=torch.bool, device=slots.device)
        untouched[batch, slots] = False
        touched = self._grouped()[batch, :, groups].transpose(1, 2)  # [windows, rows, groups, M]
        top, threshold = (part.flatten(2) for part in slot_statistics(touched, self.n))
        self.slot_top[batch, :, slots], self.slot_threshold[batch, :, slots] = top.transpose(1, 2), threshold.transpose(1, 2)
        if bool(untouched.any()):  # the untouched slots only see the moved channels change
            others = _padded(*untouched.nonzero().unbind(dim=1), count)
            self.values[batch[..., None], others[..., None], moved[:, None, :]] = insertion_values(
                self.slot_top[batch, :, others].transpose(1, 2), self.slot_threshold[batch, :, others].transpose(1, 2),
                self.flat[batch, :, moved].transpose(1, 2))
        self.values[batch, slots] = insertion_values(top, threshold, self.flat)  # last: a padded "other" may be touched
        self.current[batch, slots] = group_retained(touched, self.n).repeat_interleave(self.m, dim=-1)


def _padded(windows: torch.Tensor, items: torch.Tensor, count: int) -> torch.Tensor:
    """``[count, most items]``: the items of each window (``windows`` gives each item's), short rows padded
    by repeating their first item, empty rows with 0 (recomputing an entry writes what is written anyway)."""
    if count == 1:
        return items[None]
    order = torch.argsort(windows, stable=True)
    windows, items = windows[order], items[order]
    sizes = torch.bincount(windows, minlength=count)
    starts = torch.cumsum(sizes, 0) - sizes
    padding = torch.where(sizes > 0, items[starts.clamp(max=len(items) - 1)], 0)
    padded = padding[:, None].expand(count, int(sizes.max())).clone()
    padded[windows, torch.arange(len(items), device=items.device) - starts[windows]] = items
    return padded


def disjoint_best_pairs(gain: torch.Tensor, groups: int, m: int) -> torch.Tensor:
    """Per window of ``gain`` ``[windows, groups*M, groups*M]``, greedily pick the best positive swap, block
    both groups, repeat (at most groups/2 picks per window): ``[picks, 3]`` (window, position, position).

    The picks run on the host, all windows at once: one ``[windows, groups, groups]`` copy instead of a
    device sync per pick."""
    windows = gain.shape[0]
    per_pair = gain.reshape(windows, groups, m, groups, m).permute(0, 1, 3, 2, 4).reshape(windows, groups, groups, m * m)
    best, where = (part.cpu() for part in per_pair.max(dim=-1))
    every = torch.arange(windows)
    picks = []
    for _ in range(groups // 2):
        value, flat = best.reshape(windows, -1).max(dim=1)
        open_ = value > 0
        if not bool(open_.any()):
            break
        window, flat = (every, flat) if bool(open_.all()) else (every[open_], flat[open_])
        group_a, group_b = flat // groups, flat % groups
        slot = where[window, group_a, group_b]
        picks.append(torch.stack([window, group_a * m + slot // m, group_b * m + slot % m], dim=1))
        window, group = window.repeat(2), torch.cat([group_a, group_b])
        best[window, group, :] = -torch.inf
        best[window, :, group] = -torch.inf
    return torch.cat(picks) if picks else torch.empty(0, 3, dtype=torch.long)


class GroupRetained:
    """Top-N score sum of every M-group over all rows of all consumers, kept current under swaps."""

    def __init__(self, problem: SiteProblem, perm: torch.Tensor) -> None:
        self.n, self.m = problem.n, problem.m
        self.columns = [consumer.score.T for consumer in problem.consumers]  # [channels, rows], stored so: no copy
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
