"""Learned permutation (arXiv 2601.22980 style), made to work per layer on the true objective.

Channels are split into segments of ``b`` positions of the current order (each its own ``b x b``
permutation; random regrouping every round lets channels meet new partners). Per round:

* the reconstruction error ``sum_rows dW H dW^T`` is split into within-segment terms
  ``dW_s H_ss dW_s^T`` and a linear cross term ``2 <dW_s, C_s>`` with ``C_s`` frozen from the
  current permutation, so segments are independent and a step costs ``O(rows * n * b)``;
* cost logits per segment -> log-domain Sinkhorn at an annealed temperature (soft permutation)
  -> Hungarian (hard permutation); the forward pass uses the hard permutation and the hard N:M
  mask, the backward pass the soft ones (straight-through); Adam on the logits, on a row sample;
* the best hard permutation seen per segment is kept; segments that also improve on all rows are
  applied, and the round is accepted only if the exact full objective improves.

So the result is never worse than the starting heuristic (``init``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loguru import logger

from ..objectives import PreparedConsumer, SiteProblem
from ..sinkhorn import hard_permutation, log_sinkhorn
from .greedy import disjoint_best_pairs
from .layout import channel_domains, group_windows
from .polish import swap_candidates, swap_gains

SOFT_MASK_SHARPNESS = 0.1  # soft-mask width, relative to the mean score of the group


@dataclass
class _ConsumerState:
    """A consumer's pruned part ``dW`` and ``dW H`` under the current permutation (original channel order)."""

    consumer: PreparedConsumer
    delta: torch.Tensor
    product: torch.Tensor

    @property
    def error(self) -> float:
        return float((self.delta * self.product).sum())


@dataclass
class _SegmentData:
    """One consumer's data restricted to the segments and to sampled rows."""

    weight: torch.Tensor  # [rows, S, b]
    score: torch.Tensor  # [rows, S, b]
    hessian: torch.Tensor | None  # [S, b, b]
    act_sq: torch.Tensor | None  # [S, b]
    cross: torch.Tensor  # [rows, S, b]: frozen (dW H) from channels outside the segment
    row_weight: float


def solve_learned(
    problem: SiteProblem,
    block_size: int | None = None,
    *,
    init: str | torch.Tensor = "best",
    group_size: int = 64,
    groups: int | None = None,
    rounds: int = 6,
    steps: int = 30,
    lr: float = 0.05,
    sinkhorn_iters: int = 20,
    temperature: tuple[float, float] = (1.0, 0.05),
    rows: int = 1024,
    init_scale: float = 3.0,
    polish: bool = True,
    polish_iters: int = 8,
    polish_rows: int = 128,
    polish_group_size: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    """Learn a permutation that lowers the reconstruction error of the pruned consumers.

    ``init``: starting permutation or solver name ("best" = the heuristic with the lowest error);
    ``group_size``/``groups``: channels per learned permutation, or their number per domain (1 =
    global); ``rounds``: learn / harden / accept cycles, each on a fresh random grouping;
    ``steps``, ``lr``: Adam steps and learning rate on the cost logits per round;
    ``sinkhorn_iters``, ``temperature`` (start, end; annealed geometrically): the relaxation;
    ``rows``: output rows sampled per consumer for the learning steps (acceptance uses all rows);
    ``init_scale``: logit margin of the starting permutation (larger = the hard permutation moves
    only where gradients agree for several steps); ``polish``: after each learning phase, greedy
    swaps on the exact segment objective (``polish_iters`` swap rounds on ``polish_rows`` rows, in
    smaller random segments of ``polish_group_size`` channels: every candidate swap is scored exactly).
    """
    problem._require_statistics()
    generator = torch.Generator().manual_seed(seed)
    perm = _initial_permutation(problem, block_size, init, seed)
    states = [_consumer_state(consumer, perm, problem.n, problem.m) for consumer in problem.consumers]
    error = sum(state.error for state in states)
    domains = channel_domains(problem.channels, block_size)
    if len(domains[0]) < 2 * problem.m:
        return perm  # blocks of a single M-group: every permutation inside them is equivalent
    for round_index in range(rounds):
        segments = _segments(domains, problem.m, group_size, groups, generator).to(problem.device)
        plans = _learn_round(problem, states, perm, segments, generator, steps, lr, sinkhorn_iters, temperature, rows, init_scale)
        perm, states, error = _keep_if_better(problem, states, perm, segments, plans, error, f"round {round_index} learning")
        if polish:
            segments = _segments(domains, problem.m, polish_group_size, None, generator).to(problem.device)
            plans = _polish_round(problem, states, perm, segments, generator, polish_rows, polish_iters)
            perm, states, error = _keep_if_better(problem, states, perm, segments, plans, error, f"round {round_index} polish")
    return perm


def _initial_permutation(problem: SiteProblem, block_size: int | None, init: str | torch.Tensor, seed: int):
    from . import HEURISTIC_SOLVERS

    if isinstance(init, torch.Tensor):
        return init.clone().long().to(problem.device)
    names = list(HEURISTIC_SOLVERS) if init == "best" else [init]
    if any(name not in HEURISTIC_SOLVERS for name in names):
        raise ValueError(
            f"unknown init {init!r} for the learned solver; use 'best', a permutation, or one of {list(HEURISTIC_SOLVERS)}"
        )
    seeded = {"seed": seed}
    candidates = [HEURISTIC_SOLVERS[name](problem, block_size, **(seeded if name != "identity" else {})) for name in names]
    return min(candidates, key=problem.reconstruction_error)


def _consumer_state(consumer: PreparedConsumer, perm: torch.Tensor, n: int, m: int) -> _ConsumerState:
    delta = torch.cat([consumer.pruned_part(rows, perm, n, m) for rows in consumer.row_chunks()])
    if consumer.hessian is None:
        product = delta * consumer.act_sq
    else:
        product = torch.cat([chunk @ consumer.hessian for chunk in delta.split(consumer.chunk_rows)])
    return _ConsumerState(consumer, delta, product)


def _segments(domains, m: int, group_size: int, groups: int | None, generator: torch.Generator) -> torch.Tensor:
    """Positions ``[S, b]`` learned this round: whole M-groups, randomly regrouped inside each domain."""
    size = len(domains[0])
    count = groups if groups is not None else max(1, size // group_size)
    segment = (size // count) // m * m
    if segment < 2 * m:
        raise ValueError(f"segments of {segment} channels hold fewer than two {m}-groups; use fewer, larger groups")
    windows = group_windows(domains, m, segment, generator)
    full = [window for window in windows if window.numel() == segment]
    return torch.stack(full) if full else torch.empty(0, segment, dtype=torch.long)


def _segment_data(
    problem: SiteProblem, state: _ConsumerState, perm: torch.Tensor, segments: torch.Tensor, rows: torch.Tensor, row_weight: float
) -> _SegmentData:
    consumer = state.consumer
    channels = perm[segments]  # [S, b] original channel ids
    current = state.delta[rows][:, channels]
    hessian = act_sq = None
    if consumer.hessian is None:
        act_sq = consumer.act_sq[channels]
        within = current * act_sq
    else:
        hessian = consumer.hessian[channels[:, :, None], channels[:, None, :]]
        within = torch.einsum("rsi,sij->rsj", current, hessian)
    return _SegmentData(
        weight=consumer.weight[rows][:, channels],
        score=consumer.score[rows][:, channels],
        hessian=hessian,
        act_sq=act_sq,
        cross=state.product[rows][:, channels] - within,
        row_weight=row_weight,
    )


def _segment_loss(data: _SegmentData, plan: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Local objective per segment ``[S]``: within-segment quadratic plus frozen cross term.

    ``plan[s, i, j]`` moves local channel ``i`` to local position ``j``. Forward values use the hard
    mask; gradients flow through a soft mask (straight-through).
    """
    permuted_weight = torch.einsum("rsi,sij->rsj", data.weight, plan)
    permuted_score = torch.einsum("rsi,sij->rsj", data.score, plan)
    kept = _straight_through_mask(permuted_score, n, m)
    pruned = torch.einsum("rsj,sij->rsi", permuted_weight * (1 - kept), plan)
    if data.hessian is None:
        quadratic = pruned.square() * data.act_sq
    else:
        quadratic = torch.einsum("rsi,sij->rsj", pruned, data.hessian) * pruned
    return (quadratic + 2 * pruned * data.cross).sum(dim=(0, 2)) * data.row_weight


def _straight_through_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    grouped = scores.reshape(*scores.shape[:-1], -1, m)
    ordered = grouped.detach().sort(dim=-1, descending=True).values
    threshold = (ordered[..., n - 1 : n] + ordered[..., n : n + 1]) / 2
    width = SOFT_MASK_SHARPNESS * ordered.mean(dim=-1, keepdim=True).clamp_min(1e-12)
    soft = torch.sigmoid((grouped - threshold) / width)
    hard = (grouped.detach() > threshold).to(scores.dtype)
    hard = _exactly_n(hard, grouped.detach(), n)
    return (hard + soft - soft.detach()).reshape(scores.shape)


def _exactly_n(hard: torch.Tensor, grouped: torch.Tensor, n: int) -> torch.Tensor:
    """Ties at the threshold must still keep exactly n per group, like the pruner's top-k."""
    kept = grouped.topk(n, dim=-1).indices
    return torch.zeros_like(hard).scatter_(-1, kept, 1.0)


def _sample_rows(consumer: PreparedConsumer, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    total = consumer.weight.shape[0]
    if total <= rows:
        return torch.arange(total, device=consumer.weight.device), 1.0
    chosen = torch.randperm(total, generator=generator)[:rows].sort().values
    return chosen.to(consumer.weight.device), total / rows


def _learn_round(
    problem: SiteProblem,
    states: list[_ConsumerState],
    perm: torch.Tensor,
    segments: torch.Tensor,
    generator: torch.Generator,
    steps: int,
    lr: float,
    sinkhorn_iters: int,
    temperature: tuple[float, float],
    rows: int,
    init_scale: float,
) -> torch.Tensor:
    """Adam on per-segment cost logits; returns the best hard local plans seen ``[S, b, b]``."""
    data = [
        _segment_data(problem, state, perm, segments, *_sample_rows(state.consumer, rows, generator))
        for state in states
    ]
    count, size = segments.shape
    identity = torch.eye(size, device=problem.device).expand(count, size, size)
    noise = torch.rand(count, size, size, generator=generator).to(problem.device)
    logits = (init_scale * identity + 0.01 * noise).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    with torch.no_grad():
        best_loss = sum(_segment_loss(item, identity, problem.n, problem.m) for item in data)
    best_plan = identity.clone()
    start, end = temperature
    for step in range(steps):
        tau = start * (end / start) ** (step / max(1, steps - 1))
        log_plan = log_sinkhorn(logits, tau, sinkhorn_iters)
        soft = log_plan.exp()
        hard = hard_permutation(log_plan)
        plan = hard + soft - soft.detach()
        loss = sum(_segment_loss(item, plan, problem.n, problem.m) for item in data)
        with torch.no_grad():
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_plan[better] = hard[better]
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    return best_plan


def _polish_round(
    problem: SiteProblem,
    states: list[_ConsumerState],
    perm: torch.Tensor,
    segments: torch.Tensor,
    generator: torch.Generator,
    rows: int,
    iterations: int,
) -> torch.Tensor:
    """Best disjoint improving swaps per segment on the exact local objective; returns plans ``[S, b, b]``."""
    data = [
        _segment_data(problem, state, perm, segments, *_sample_rows(state.consumer, rows, generator))
        for state in states
    ]
    count, size = segments.shape
    groups = size // problem.m
    first, second, touched = swap_candidates(size, problem.m, problem.device)
    order = torch.arange(size, device=problem.device).repeat(count, 1)
    for _ in range(iterations):
        gain = sum(_reordered_gains(item, order, touched, problem.n, problem.m) for item in data)
        matrix = torch.full((count, size, size), -torch.inf, device=problem.device)
        matrix[:, first, second] = gain
        matrix[:, second, first] = gain
        swaps = [(segment, a, c) for segment in range(count) for a, c in disjoint_best_pairs(matrix[segment], groups, problem.m)]
        if not swaps:
            break
        segment_index, a, c = (torch.tensor(column, device=problem.device) for column in zip(*swaps))
        order[segment_index, a], order[segment_index, c] = order[segment_index, c], order[segment_index, a]
    plans = torch.zeros(count, size, size, device=problem.device)
    plans.scatter_(1, order[:, None, :], 1.0)
    return plans


def _reordered_gains(data: _SegmentData, order: torch.Tensor, touched: torch.Tensor, n: int, m: int) -> torch.Tensor:
    index = order[None].expand_as(data.weight)
    hessian = act_sq = None
    if data.hessian is None:
        act_sq = data.act_sq.gather(1, order)
    else:
        hessian = data.hessian.gather(1, order[:, :, None].expand_as(data.hessian))
        hessian = hessian.gather(2, order[:, None, :].expand_as(hessian))
    gains = swap_gains(
        data.weight.gather(2, index), data.score.gather(2, index), hessian, act_sq, data.cross.gather(2, index), touched, n, m
    )
    return gains * data.row_weight


def _apply_plans(perm: torch.Tensor, segments: torch.Tensor, plans: torch.Tensor) -> torch.Tensor:
    local = plans.argmax(dim=1)  # [S, b]: local position j takes local channel local[s, j]
    updated = perm.clone()
    updated[segments] = perm[segments.gather(1, local)]
    return updated


def _keep_if_better(
    problem: SiteProblem,
    states: list[_ConsumerState],
    perm: torch.Tensor,
    segments: torch.Tensor,
    plans: torch.Tensor,
    error: float,
    phase: str,
) -> tuple[torch.Tensor, list[_ConsumerState], float]:
    """Apply the segments whose plan improves on all rows; keep the result only if the exact error drops.

    Cross-segment interactions are not in the local objective, so on failure the better half of
    the improving segments is tried, and so on.
    """
    identity = torch.eye(segments.shape[1], device=problem.device).expand_as(plans)
    gain = torch.zeros(segments.shape[0], device=problem.device)
    for state in states:
        for rows in state.consumer.row_chunks():
            indices = torch.arange(state.consumer.weight.shape[0], device=problem.device)[rows]
            data = _segment_data(problem, state, perm, segments, indices, 1.0)
            with torch.no_grad():
                gain += _segment_loss(data, identity, problem.n, problem.m) - _segment_loss(data, plans, problem.n, problem.m)
    order = gain.argsort(descending=True)
    chosen = order[gain[order] > 0]
    while chosen.numel():
        candidate = _apply_plans(perm, segments[chosen], plans[chosen])
        candidate_states = [_consumer_state(state.consumer, candidate, problem.n, problem.m) for state in states]
        candidate_error = sum(state.error for state in candidate_states)
        if candidate_error < error:
            logger.debug("learned permutation, {}: error {:.6g} -> {:.6g}", phase, error, candidate_error)
            return candidate, candidate_states, candidate_error
        chosen = chosen[: chosen.numel() // 2]
    return perm, states, error
