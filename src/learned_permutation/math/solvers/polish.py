"""Greedy polish on the true (Hessian) objective inside learned segments.

For every pair of channels in different M-groups of a segment, the exact change of the
segment-local objective ``dW H dW^T + 2 <dW, C>`` (cross term ``C`` frozen) caused by swapping
them is computed at once: only the 2M channels of the two touched groups change, so each candidate
costs ``O(rows * (2M)^2)``. Off-diagonal Hessian terms are included, which the retained-score
greedy cannot see.
"""

from __future__ import annotations

import torch

from ..masks import nm_mask

SEGMENT_CHUNK_ELEMENTS = 1 << 20  # gathered [segments, rows, pairs, 2M] elements per chunk: cache-sized


def swap_candidates(size: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unordered position pairs ``(a, c)`` in different groups, and the 2M positions each swap touches."""
    first, second = torch.triu_indices(size, size, offset=1, device=device)
    different = first // m != second // m
    first, second = first[different], second[different]
    slots = torch.arange(m, device=device)
    others = [(first // m * m)[:, None] + slots, (second // m * m)[:, None] + slots]
    # group A after the swap holds A's other slots plus c; group B holds B's other slots plus a
    group_a = torch.where(others[0] == first[:, None], second[:, None], others[0])
    group_b = torch.where(others[1] == second[:, None], first[:, None], others[1])
    return first, second, torch.cat([group_a, group_b], dim=1)


def swap_gains(
    weight: torch.Tensor,
    score: torch.Tensor,
    hessian: torch.Tensor | None,
    act_sq: torch.Tensor | None,
    cross: torch.Tensor,
    touched: torch.Tensor,
    n: int,
    m: int,
) -> torch.Tensor:
    """Objective decrease ``[S, pairs]`` of every candidate swap, for data in the current local order.

    ``weight``/``score``/``cross``: ``[S, rows, b]``; ``hessian``: ``[S, b, b]`` or ``act_sq`` ``[S, 1, b]``.
    """
    segments, rows, _ = weight.shape
    kept = kept_mask(score, n, m)
    pruned = weight * (1 - kept)
    gradient = (pruned * act_sq if hessian is None else torch.bmm(pruned, hessian)) + cross
    step = max(1, SEGMENT_CHUNK_ELEMENTS // max(1, rows * touched.numel()))
    gains = []
    for start in range(0, segments, step):
        part = slice(start, start + step)
        new_kept = kept_mask(score[part][:, :, touched], n, m)  # [s, rows, pairs, 2M]
        change = weight[part][:, :, touched] * (kept[part][:, :, touched] - new_kept)
        linear = 2 * (change * gradient[part][:, :, touched]).sum(dim=(1, 3))
        if hessian is None:
            quadratic = (change.square() * act_sq[part][:, :, touched]).sum(dim=(1, 3))
        else:
            block = hessian[part][:, touched[:, :, None], touched[:, None, :]]  # [s, pairs, 2M, 2M]
            quadratic = torch.einsum("srpi,spij,srpj->sp", change, block, change)
        gains.append(-(linear + quadratic))
    return torch.cat(gains)


def kept_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``nm_mask`` as 0/1 floats of the scores' dtype, for products with weights."""
    return nm_mask(scores, n, m).to(scores.dtype)
