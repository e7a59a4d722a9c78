"""A hard N:M mask in a learned channel order, with a straight-through gradient to a soft permutation.

A permutation is learned as cost logits ``[B, b, b]``: ``B`` blocks of ``b`` contiguous channels,
each with its own ``b x b`` permutation (``B = 1``: one permutation of every channel). Log-domain
Sinkhorn turns the logits into a soft permutation ``plan`` (``plan[k, i, j]``: how much local channel
``i`` of block ``k`` goes to position ``j``); Hungarian gives the hard one.

The pruned weight, read in the original channel order, is ``W_eff = W * (M P^T)``: ``M`` is the N:M
mask of the score in the order ``P`` (a mask per position), and ``M P^T`` gives each channel the mask
of the position it is sent to. The forward pass uses the hard permutation exactly (a gather and a
scatter, no ``n x n`` product). The backward pass holds ``M`` fixed and returns the gradient of that
relaxation at the hard point to the soft plan (straight-through), where it flows through Sinkhorn to
the logits: ``dL/dP = (G * W)^T M`` with ``G = dL/dW_eff``, one ``b x out x b`` product per block.
Entry ``(i, j)`` is the first-order change of the loss if channel ``i`` were kept as position ``j`` is.

Why not differentiate ``((W P) * M) P^T``, the permute-mask-unpermute of the paper's figure: at a hard
point its linearisation is dominated by ``W (D P^T + P D^T)``, which a true permutation cancels at
second order; on stories260K its predicted change of the loss for single channel swaps did not even
rank the swaps' real effect (Spearman -0.14 over 40 swaps), so training on it made the loss worse.
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

        def blocks(matrix):  # [out, B * b] -> [B, out, b]
            return matrix.reshape(matrix.shape[0], ctx.blocks, -1).transpose(0, 1)

        grad_plan = blocks(grad.to(weight.dtype) * weight).transpose(1, 2) @ blocks(keep.to(weight.dtype))
        return grad_plan, None, None, None
