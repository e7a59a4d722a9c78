"""SparseGPT's N:M pruning with optimal-brain-surgeon updates, batched over candidate column orders.

The same procedure as llm-compressor's ``sparsify_weight`` (damped inverse-Hessian Cholesky factor,
columns processed left to right in blocks, every M-th column choosing the group's pruned weights by
``w^2 / [H^-1]_jj^2``, each pruned column's error spread over the later columns), written so that a
leading batch dimension carries several candidates at once: the per-column Python loop, which
dominates the cost on small layers, is paid once for all candidates. ``tests/math/test_obs.py``
checks it against llm-compressor's own function.
"""

from __future__ import annotations

import torch

__all__ = ["damped_inverse", "obs_prune", "obs_prune_with_inverse"]


def obs_prune(
    weight: torch.Tensor, hessian: torch.Tensor, prune_n: int, m: int, block_size: int = 128, dampening: float = 0.01
) -> torch.Tensor:
    """Pruned weights ``[..., rows, cols]`` for weights ``[..., rows, cols]`` and Hessians ``[..., cols, cols]``.

    ``prune_n`` of every ``m`` consecutive columns are zeroed per row (llm-compressor's convention for
    its ``N:M`` mask structures, which prunes N of M; the two agree for 2:4 and 4:8)."""
    inverse, dead = damped_inverse(hessian, dampening)
    return obs_prune_with_inverse(weight, inverse, dead, prune_n, m, block_size)


def damped_inverse(hessian: torch.Tensor, dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + dampening * mean(diag H) I)^-1`` with dead inputs (zero diagonal) given a unit diagonal, and
    the dead-input mask ``[..., cols]``. Both commute with a column order (the dampening uses the mean),
    so one inverse serves every candidate order: ``inverse[order][:, order]``."""
    hessian = hessian.detach().float().clone()
    diagonal = hessian.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal.add_(dead.float())
    diagonal.add_(dampening * diagonal.mean(dim=-1, keepdim=True))
    return torch.cholesky_inverse(torch.linalg.cholesky(hessian)), dead


def obs_prune_with_inverse(
    weight: torch.Tensor, inverse: torch.Tensor, dead: torch.Tensor, prune_n: int, m: int, block_size: int = 128
) -> torch.Tensor:
    """``obs_prune`` from the damped inverse Hessian and dead-input mask of ``damped_inverse`` (in the
    weight's column order)."""
    weight = weight.detach().float().clone()
    columns = weight.shape[-1]
    weight.masked_fill_(dead.unsqueeze(-2), 0.0)
    factor = torch.linalg.cholesky(inverse, upper=True)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block = weight[..., start:stop].clone()
        block_factor = factor[..., start:stop, start:stop]
        block_diagonal = block_factor.diagonal(dim1=-2, dim2=-1)  # [..., count]
        errors = torch.zeros_like(block)
        pruned = torch.zeros_like(block, dtype=torch.bool)
        for column in range(stop - start):
            if column % m == 0:
                saliency = block[..., column : column + m].square() / block_diagonal[..., None, column : column + m].square()
                smallest = saliency.topk(prune_n, dim=-1, largest=False).indices
                pruned[..., column : column + m].scatter_(-1, smallest, True)
            value = block[..., column]
            error = (value * pruned[..., column]) / block_diagonal[..., column, None]
            block[..., column:] -= error.unsqueeze(-1) * block_factor[..., column, None, column:]
            errors[..., column] = error
        block.masked_fill_(pruned, 0.0)
        weight[..., start:stop] = block
        weight[..., stop:] -= errors @ factor[..., start:stop, stop:]
    return weight
