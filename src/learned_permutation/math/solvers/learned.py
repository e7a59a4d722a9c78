"""Learned permutation (arXiv 2601.22980 style), made to work per layer on the true objective.

Channels are split into segments of ``b`` positions of the current order (whole M-groups; each
segment is its own ``b x b`` permutation, and a fresh random regrouping every round lets channels
meet new partners). Per round:

* the reconstruction error ``sum_rows dW H dW^T`` is split into within-segment terms
  ``dW_s H_ss dW_s^T`` and a linear cross term ``2 <dW_s, C_s>`` with ``C_s`` frozen from the
  current permutation, so segments are independent and a step costs ``O(rows * n * b)``;
* learning: cost logits per segment -> log-domain Sinkhorn at an annealed temperature (soft
  permutation) -> Hungarian (hard permutation); the forward pass uses the hard permutation and
  the hard N:M mask, the backward pass the soft ones (straight-through); Adam on the logits, on a
  row sample; the best hard permutation seen per segment is kept;
* polish (optional): from the learned permutations, greedy swaps between the groups of each
  segment on the exact local objective;
* acceptance: the segments whose permutation improves the local objective on all rows are
  applied, and the round is kept only if the exact full objective drops. The check is
  incremental: only the moved channels' columns of ``dW`` change, so it costs one
  ``rows x moved x n`` product instead of recomputing ``dW H``; on failure the better half of the
  improving segments is tried, and so on.

So the result is never worse than the starting heuristic (``init``). Memory: the weight, its
scores, ``dW`` and ``dW H`` (four ``out x n`` fp32 matrices per consumer) plus the Hessian, one
more ``out x n`` matrix while a round is checked, and ``segments x rows x b`` learning tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loguru import logger

from ..masks import nm_mask
from ..objectives import PreparedConsumer, SiteProblem
from ..permutations import check_permutation
from ..sinkhorn import hard_permutation, log_sinkhorn
from ..threads import dense_threads
from .greedy import disjoint_best_pairs
from .layout import channel_domains, group_windows
from .polish import kept_mask, swap_candidates, swap_gains

SOFT_MASK_SHARPNESS = 0.1  # soft-mask width, relative to the mean score of the group
ACCEPT_TOLERANCE = 1e-6  # relative error drop below which a round is float noise, not an improvement


@dataclass
class _ConsumerState:
    """A consumer's pruned part ``dW``, ``dW H`` and ``tr(dW H dW^T)`` under the current permutation.

    Both matrices are ``[out, n]`` in the original channel order.
    """

    consumer: PreparedConsumer
    delta: torch.Tensor
    product: torch.Tensor
    error: float


@dataclass
class _SegmentData:
    """One consumer's data restricted to the segments and to sampled rows, segment-major."""

    weight: torch.Tensor  # [S, rows, b]
    score: torch.Tensor  # [S, rows, b]
    hessian: torch.Tensor | None  # [S, b, b]
    act_sq: torch.Tensor | None  # [S, 1, b]
    cross: torch.Tensor  # [S, rows, b]: frozen (dW H) from channels outside the segment
    row_weight: float

    def select(self, index: torch.Tensor) -> _SegmentData:
        """The data of the segments ``index`` only."""
        return _SegmentData(
            self.weight[index],
            self.score[index],
            None if self.hessian is None else self.hessian[index],
            None if self.act_sq is None else self.act_sq[index],
            self.cross[index],
            self.row_weight,
        )

    def reordered(self, order: torch.Tensor) -> _SegmentData:
        """The data in local order ``order`` ``[S, b]`` (position j holds local channel ``order[s, j]``)."""
        index = order[:, None, :].expand_as(self.weight)
        hessian = act_sq = None
        if self.hessian is None:
            act_sq = self.act_sq.gather(2, order[:, None, :])
        else:
            hessian = self.hessian.gather(1, order[:, :, None].expand_as(self.hessian))
            hessian = hessian.gather(2, order[:, None, :].expand_as(hessian))
        return _SegmentData(
            self.weight.gather(2, index), self.score.gather(2, index), hessian, act_sq, self.cross.gather(2, index), self.row_weight
        )


@dataclass
class _Update:
    """The exact effect on one consumer of moving the channels ``channels`` (whole groups)."""

    channels: torch.Tensor
    delta: torch.Tensor  # [out, K] new dW columns
    product: torch.Tensor  # [out, n] change of dW H, or [out, K] on the diagonal objective
    error_change: float
    diagonal: bool

    def apply(self, state: _ConsumerState) -> None:
        state.delta[:, self.channels] = self.delta
        if self.diagonal:
            state.product[:, self.channels] += self.product
        else:
            state.product += self.product
        state.error += self.error_change


def solve_learned(
    problem: SiteProblem,
    block_size: int | None = None,
    *,
    init: str | torch.Tensor = "best",
    group_size: int = 16,
    groups: int | None = None,
    rounds: int = 6,
    steps: int = 30,
    lr: float = 0.2,
    sinkhorn_iters: int = 20,
    temperature: tuple[float, float] = (1.0, 0.05),
    rows: int = 256,
    init_scale: float = 0.5,
    polish: bool = True,
    polish_iters: int = 8,
    polish_rows: int = 128,
    seed: int = 0,
) -> torch.Tensor:
    """Learn a permutation that lowers the reconstruction error of the pruned consumers.

    ``init``: starting permutation or solver name ("best" = the heuristic with the lowest error);
    ``group_size``/``groups``: channels per learned permutation (whole M-groups), or their number
    per domain (1 = global); cost per step grows with ``group_size``;
    ``rounds``: learn / polish / accept cycles, each on a fresh random grouping;
    ``steps``, ``lr``: Adam steps and learning rate on the cost logits per round (0 steps = polish only);
    ``sinkhorn_iters``, ``temperature`` (start, end; annealed geometrically): the relaxation;
    ``rows``: output rows sampled per consumer for the learning steps (acceptance uses all rows);
    ``init_scale``: logit margin of the starting permutation (larger = the hard permutation moves
    only where gradients agree for several steps); ``polish``: after learning, greedy swaps on the
    exact segment objective (``polish_iters`` swap rounds on ``polish_rows`` sampled rows).

    Defaults: 16-channel segments (the polish is cheapest there and, on the 4096 x 11008 synthetic
    layer, better than 64), ``init_scale=0.5`` with ``lr=0.2`` (at ``init_scale=3, lr=0.05`` the
    hard permutation never left its start within 30 steps, so learning had no effect), and
    ``rows=256`` (4x cheaper learning steps than 1024 at equal quality there). Per round the cost
    is ``O(steps * rows * n * group_size)`` for learning plus ``O(polish_iters * polish_rows * n *
    group_size * M)`` for the polish, plus one ``out x moved x n`` product per accepted round; the
    heuristic start adds three full ``dW H`` products and the greedy solver. A 4096 x 11008 layer
    takes about 5 minutes on 2 CPU cores (see ``results/solvers/solvers.md``).
    """
    problem._require_statistics()
    generator = torch.Generator().manual_seed(seed)
    perm, states = _initial_permutation(problem, block_size, init, seed)
    domains = channel_domains(problem.channels, block_size)
    if len(domains[0]) < 2 * problem.m:
        return perm  # blocks of a single M-group: every permutation inside them is equivalent
    for round_index in range(rounds):
        segments = _segments(domains, problem.m, group_size, groups, generator).to(problem.device)
        if segments.numel() == 0:
            continue
        if steps > 0:
            orders = _learn_round(problem, states, perm, segments, generator, steps, lr, sinkhorn_iters, temperature, rows, init_scale)
        else:
            orders = _identity_orders(segments)
        if polish:
            orders = _polish_round(problem, states, perm, segments, orders, generator, polish_rows, polish_iters)
        perm = _keep_if_better(problem, states, perm, segments, orders, f"round {round_index}")
    return perm


def _initial_permutation(
    problem: SiteProblem, block_size: int | None, init: str | torch.Tensor, seed: int
) -> tuple[torch.Tensor, list[_ConsumerState]]:
    """The starting permutation (the lowest-error candidate) and its consumer states."""
    from . import HEURISTIC_SOLVERS

    if isinstance(init, torch.Tensor):
        check_permutation(init, problem.channels, block_size)
        candidates = [init.clone().long().to(problem.device)]
    else:
        names = list(HEURISTIC_SOLVERS) if init == "best" else [init]
        if any(name not in HEURISTIC_SOLVERS for name in names):
            raise ValueError(
                f"unknown init {init!r} for the learned solver; use 'best', a permutation, or one of {list(HEURISTIC_SOLVERS)}"
            )
        candidates = (HEURISTIC_SOLVERS[name](problem, block_size, seed=seed) for name in names)
    best: tuple[float, torch.Tensor, list[_ConsumerState]] | None = None
    for perm in candidates:
        states = [_consumer_state(consumer, perm, problem.n, problem.m) for consumer in problem.consumers]
        error = sum(state.error for state in states)
        if best is None or error < best[0]:
            best = (error, perm, states)
    return best[1], best[2]


def _consumer_state(consumer: PreparedConsumer, perm: torch.Tensor, n: int, m: int) -> _ConsumerState:
    delta = torch.cat([consumer.pruned_part(rows, perm, n, m) for rows in consumer.row_chunks()])
    with dense_threads():
        if consumer.hessian is None:
            product = delta * consumer.act_sq
        else:
            product = torch.cat([chunk @ consumer.hessian for chunk in delta.split(consumer.chunk_rows)])
    return _ConsumerState(consumer, delta, product, _dot(delta, product, consumer.chunk_rows))


def _dot(first: torch.Tensor, second: torch.Tensor, chunk_rows: int) -> float:
    """``sum(first * second)`` accumulated in float64, row chunk by row chunk."""
    return sum(
        float((a * b).sum(dtype=torch.float64)) for a, b in zip(first.split(chunk_rows), second.split(chunk_rows))
    )


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


def _identity_orders(segments: torch.Tensor) -> torch.Tensor:
    return torch.arange(segments.shape[1], device=segments.device).repeat(segments.shape[0], 1)


def _segment_data(
    state: _ConsumerState, perm: torch.Tensor, segments: torch.Tensor, rows: torch.Tensor | slice, row_weight: float
) -> _SegmentData:
    consumer = state.consumer
    channels = perm[segments]  # [S, b] original channel ids
    count, size = channels.shape
    flat = channels.reshape(-1)

    def segment_major(matrix: torch.Tensor) -> torch.Tensor:
        return matrix[rows][:, flat].reshape(-1, count, size).transpose(0, 1).contiguous()

    current = segment_major(state.delta)
    hessian = act_sq = None
    if consumer.hessian is None:
        act_sq = consumer.act_sq[channels][:, None, :]
        within = current * act_sq
    else:
        hessian = consumer.hessian[channels[:, :, None], channels[:, None, :]]
        within = torch.bmm(current, hessian)
    return _SegmentData(
        weight=segment_major(consumer.weight),
        score=segment_major(consumer.score),
        hessian=hessian,
        act_sq=act_sq,
        cross=segment_major(state.product) - within,
        row_weight=row_weight,
    )


def _segment_loss(data: _SegmentData, plan: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Local objective per segment ``[S]``: within-segment quadratic plus frozen cross term.

    ``plan[s, i, j]`` moves local channel ``i`` to local position ``j``. Forward values use the hard
    mask; gradients flow through a soft mask (straight-through).
    """
    permuted_weight = torch.bmm(data.weight, plan)
    permuted_score = torch.bmm(data.score, plan)
    kept = _straight_through_mask(permuted_score, n, m)
    pruned = torch.bmm(permuted_weight * (1 - kept), plan.transpose(1, 2))
    if data.hessian is None:
        quadratic = pruned.square() * data.act_sq
    else:
        quadratic = torch.bmm(pruned, data.hessian) * pruned
    return (quadratic + 2 * pruned * data.cross).sum(dim=(1, 2)) * data.row_weight


def _local_loss(data: _SegmentData, order: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``_segment_loss`` of hard local orders ``[S, b]``, by gathering instead of matrix products."""
    ordered = data.reordered(order)
    pruned = ordered.weight * (1 - kept_mask(ordered.score, n, m))
    if ordered.hessian is None:
        quadratic = pruned.square() * ordered.act_sq
    else:
        quadratic = torch.bmm(pruned, ordered.hessian) * pruned
    return (quadratic + 2 * pruned * ordered.cross).sum(dim=(1, 2), dtype=torch.float64) * data.row_weight


def _straight_through_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    grouped = scores.reshape(*scores.shape[:-1], -1, m)
    ordered = grouped.detach().sort(dim=-1, descending=True).values
    threshold = (ordered[..., n - 1 : n] + ordered[..., n : n + 1]) / 2
    width = SOFT_MASK_SHARPNESS * ordered.mean(dim=-1, keepdim=True).clamp_min(1e-12)
    soft = torch.sigmoid((grouped - threshold) / width)
    hard = kept_mask(grouped.detach(), n, m)  # exactly n per group even with ties, like the pruner's top-k
    return (hard + soft - soft.detach()).reshape(scores.shape)


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
    """Adam on per-segment cost logits; returns the best hard local orders seen ``[S, b]``."""
    data = [_segment_data(state, perm, segments, *_sample_rows(state.consumer, rows, generator)) for state in states]
    count, size = segments.shape
    identity = torch.eye(size, device=problem.device).expand(count, size, size)
    noise = torch.rand(count, size, size, generator=generator).to(problem.device)
    logits = (init_scale * identity + 0.01 * noise).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    best_order = _identity_orders(segments)
    with torch.no_grad():
        best_loss = sum(_local_loss(item, best_order, problem.n, problem.m) for item in data)
    start, end = temperature
    for step in range(steps):
        tau = start * (end / start) ** (step / max(1, steps - 1))
        log_plan = log_sinkhorn(logits, tau, sinkhorn_iters)
        soft = log_plan.exp()
        hard = hard_permutation(log_plan)
        loss = sum(_segment_loss(item, hard + soft - soft.detach(), problem.n, problem.m) for item in data)
        with torch.no_grad():
            better = loss.double() < best_loss
            best_loss = torch.where(better, loss.double(), best_loss)
            best_order[better] = hard[better].argmax(dim=1)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    return best_order


def _polish_round(
    problem: SiteProblem,
    states: list[_ConsumerState],
    perm: torch.Tensor,
    segments: torch.Tensor,
    orders: torch.Tensor,
    generator: torch.Generator,
    rows: int,
    iterations: int,
) -> torch.Tensor:
    """Best disjoint improving swaps per segment on the exact local objective, from ``orders`` ``[S, b]``.

    The data (and the frozen cross term) do not change during the polish, so a segment that found
    no improving swap is final and drops out of later swap rounds.
    """
    data = [_segment_data(state, perm, segments, *_sample_rows(state.consumer, rows, generator)) for state in states]
    count, size = segments.shape
    groups = size // problem.m
    first, second, touched = swap_candidates(size, problem.m, problem.device)
    order = orders.clone()
    active = torch.arange(count, device=problem.device)  # segments whose last swap round changed them
    for _ in range(iterations):
        gain = 0
        for item in data:
            ordered = item.select(active).reordered(order[active])
            gains = swap_gains(
                ordered.weight, ordered.score, ordered.hessian, ordered.act_sq, ordered.cross, touched, problem.n, problem.m
            )
            gain = gain + gains * item.row_weight
        matrix = torch.full((active.numel(), size, size), -torch.inf, device=problem.device)
        matrix[:, first, second] = gain
        matrix[:, second, first] = gain
        swaps = disjoint_best_pairs(matrix, groups, problem.m).to(problem.device)  # [swaps, 3] segment, a, c
        if not len(swaps):
            break
        local, a, c = swaps.unbind(dim=1)
        segment_index = active[local]
        order[segment_index, a], order[segment_index, c] = order[segment_index, c], order[segment_index, a]
        active = segment_index.unique()  # a segment without an improving swap keeps its gains: it is done
    return order


def _apply_orders(perm: torch.Tensor, segments: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    updated = perm.clone()
    updated[segments] = perm[segments.gather(1, orders)]
    return updated


def _keep_if_better(
    problem: SiteProblem,
    states: list[_ConsumerState],
    perm: torch.Tensor,
    segments: torch.Tensor,
    orders: torch.Tensor,
    phase: str,
) -> torch.Tensor:
    """Apply the segments whose order improves on all rows, if the exact error drops; updates ``states``.

    Cross-segment interactions are not in the local objective, so on failure the better half of
    the improving segments is tried, and so on.
    """
    moved = (orders != _identity_orders(segments)).any(dim=1).nonzero().flatten()
    if moved.numel() == 0:
        return perm
    segments, orders = segments[moved], orders[moved]
    identity = _identity_orders(segments)
    gain = torch.zeros(segments.shape[0], dtype=torch.float64, device=problem.device)
    with torch.no_grad():
        for state in states:
            for rows in state.consumer.row_chunks():
                data = _segment_data(state, perm, segments, rows, 1.0)
                gain += _local_loss(data, identity, problem.n, problem.m) - _local_loss(data, orders, problem.n, problem.m)
    ranked = gain.argsort(descending=True)
    chosen = ranked[gain[ranked] > 0]
    error = sum(state.error for state in states)
    while chosen.numel():
        candidate = _apply_orders(perm, segments[chosen], orders[chosen])
        positions = segments[chosen].reshape(-1)
        updates = [_update(state, candidate, positions, problem.n, problem.m) for state in states]
        change = sum(update.error_change for update in updates)
        if change < -ACCEPT_TOLERANCE * abs(error):
            for state, update in zip(states, updates):
                update.apply(state)
            logger.debug("learned permutation, {}: error {:.6g} -> {:.6g}", phase, error, error + change)
            return candidate
        chosen = chosen[: chosen.numel() // 2]
    return perm


def _update(state: _ConsumerState, candidate: torch.Tensor, positions: torch.Tensor, n: int, m: int) -> _Update:
    """Exact change of ``dW``, ``dW H`` and the error when the channels at ``positions`` take ``candidate``'s order.

    ``positions`` hold whole M-groups, consecutive, so the moved channels' masks depend only on them.
    """
    consumer = state.consumer
    channels = candidate[positions]
    delta = torch.cat(
        [
            consumer.weight[rows][:, channels] * ~nm_mask(consumer.score[rows][:, channels], n, m)
            for rows in consumer.row_chunks()
        ]
    )
    difference = delta - state.delta[:, channels]
    step = consumer.chunk_rows
    with dense_threads():
        if consumer.hessian is None:
            product = difference * consumer.act_sq[channels]
            moved_product = product
        elif 2 * channels.numel() <= consumer.weight.shape[1]:
            rows_of_hessian = consumer.hessian[channels]
            product = torch.cat([chunk @ rows_of_hessian for chunk in difference.split(step)])
            moved_product = product[:, channels]
        else:  # most channels moved: scatter into full width rather than copying most of the Hessian
            parts = []
            for chunk in difference.split(step):
                full = torch.zeros(chunk.shape[0], consumer.weight.shape[1], dtype=chunk.dtype, device=chunk.device)
                full[:, channels] = chunk
                parts.append(full @ consumer.hessian)
            product = torch.cat(parts)
            moved_product = product[:, channels]
    change = 2 * _dot(difference, state.product[:, channels], step) + _dot(difference, moved_product, step)
    return _Update(channels, delta, product, change, consumer.hessian is None)
