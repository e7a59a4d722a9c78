"""A hard N:M mask in a learned channel order, with a straight-through gradient to a soft permutation.

A permutation is learned as cost logits ``[B, b, b]``: ``B`` blocks of ``b`` contiguous channels,
each with its own ``b x b`` permutation (``B = 1``: one permutation of every channel). Log-domain
Sinkhorn turns the logits into a soft permutation ``plan`` (``plan[k, i, j]``: how much local channel
``i`` of block ``k`` goes to position ``j``); Hungarian gives the hard one.

The pruned weight in a channel order ``P`` and read back in the original order is
``W_eff(P) = ((W P) * M) P^T``, with ``M`` the N:M mask of the score in that order. The forward pass
uses the hard permutation exactly (a gather and a scatter, no ``n x n`` product); the backward pass
returns ``dL/dP`` at that hard point to the soft plan (straight-through), where it flows through
Sinkhorn to the logits: ``dL/dP = W^T ((G P) * M) + G^T ((W P) * M)`` with ``G = dL/dW_eff``,
one ``b x out x b`` product per block. With ``M`` all ones ``W_eff`` would not depend on ``P``; the
gradient is the mask's doing.
"""

from __future__ import annotations

import math

import torch

from .masks import nm_mask
from .sinkhorn import hard_permutation, log_sinkhorn

__all__ = [
    "annealed_temperature",
    "block_logits",
    "hard_columns",
    "pruned_in_order",
    "soft_permutation",
]


def block_logits(size: int, block: int, scale: float) -> torch.Tensor:
    """Logits ``[size // block, block, block]`` whose hard permutation is the identity, with margin ``scale``."""
    if block <= 0 or size % block:
        raise ValueError(f"block of {block} channels must be positive and divide the {size} channels")
    return torch.eye(block).repeat(size // block, 1, 1) * scale


def soft_permutation(logits: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """The doubly stochastic relaxation of ``logits`` at ``temperature`` (differentiable)."""
    return log_sinkhorn(logits, temperature, iterations).exp()


def hard_columns(logits: torch.Tensor) -> torch.Tensor:
    """The hard permutation of ``logits`` ``[B, b, b]`` as a column index over all ``B * b`` channels:
    entry ``j`` is the channel placed at position ``j`` (``W_new = W[:, columns]``); channels stay in their block."""
    count, block = logits.shape[0], logits.shape[-1]
    local = hard_permutation(logits).argmax(dim=-2)  # [B, b]: the local channel at each position
    offsets = torch.arange(count, device=logits.device)[:, None] * block
    return (local + offsets).flatten()


def annealed_temperature(step: int, steps: int, start: float, end: float) -> float:
    """Geometric schedule from ``start`` (step 0) to ``end`` (the last step)."""
    if steps <= 1:
        return end
    return start * math.exp(math.log(end / start) * step / (steps - 1))


def pruned_in_order(
    weight: torch.Tensor, scores: torch.Tensor, plan: torch.Tensor, columns: torch.Tensor, n: int, m: int
) -> torch.Tensor:
    """``weight`` with the N:M mask of ``scores`` taken in the channel order ``columns``, in the original
    order (forward: exact); its gradient goes to the soft ``plan`` ``[B, b, b]`` whose hard permutation
    ``columns`` is meant to be (straight-through). ``weight`` gets no gradient (it is frozen)."""
    keep = nm_mask(scores[:, columns], n, m)
    return _MaskedThroughPermutation.apply(plan, weight.detach(), columns, keep)


class _MaskedThroughPermutation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, weight, columns, keep):
        ctx.save_for_backward(weight, columns, keep)
        ctx.blocks = plan.shape[0]
        pruned = torch.empty_like(weight)
        pruned[:, columns] = weight[:, columns] * keep
        return pruned

    @staticmethod
    def backward(ctx, grad):
        weight, columns, keep = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        masked_grad = grad[:, columns] * keep  # (G P) * M
        masked_weight = weight[:, columns] * keep  # (W P) * M

        def blocks(matrix):  # [out, B * b] -> [B, out, b]
            return matrix.reshape(matrix.shape[0], ctx.blocks, -1).transpose(0, 1)

        grad_plan = blocks(weight).transpose(1, 2) @ blocks(masked_grad)
        grad_plan = grad_plan + blocks(grad).transpose(1, 2) @ blocks(masked_weight)
        return grad_plan, None, None, None
