"""The straight-through masked weight: exact hard forward, and the gradient of the relaxation W * (M P^T)."""

from __future__ import annotations

import pytest
import torch

from learned_permutation.math import nm_mask
from learned_permutation.math.objectives import mask_in_original_order
from learned_permutation.math.permutations import check_permutation
from learned_permutation.math.straight_through import (
    annealed_temperature,
    block_logits,
    hard_columns,
    pruned_in_order,
    soft_permutation,
)

N, M = 2, 4


def block_diagonal(plan: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*plan)


@pytest.mark.parametrize("blocks", [1, 4])
def test_forward_is_the_hard_mask_and_backward_the_gradient_of_the_relaxed_weight(blocks):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 16, generator=generator)
    scores = weight.abs()
    logits = torch.randn(blocks, 16 // blocks, 16 // blocks, generator=generator)
    columns = hard_columns(logits)
    check_permutation(columns, 16, 16 // blocks)
    hard_plan = torch.zeros(blocks, 16 // blocks, 16 // blocks)
    local = columns.reshape(blocks, -1) - torch.arange(blocks)[:, None] * (16 // blocks)
    hard_plan[torch.arange(blocks)[:, None], local, torch.arange(16 // blocks)] = 1.0
    hard_plan.requires_grad_(True)
    output_grad = torch.randn(6, 16, generator=generator)

    pruned = pruned_in_order(weight, scores, hard_plan, columns, N, M)
    assert torch.equal(pruned, weight * mask_in_original_order(scores, columns, N, M))
    (pruned * output_grad).sum().backward()

    dense_plan = hard_plan.detach().clone().requires_grad_(True)
    relaxed = weight * (nm_mask(scores[:, columns], N, M).float() @ block_diagonal(dense_plan).T)
    (relaxed * output_grad).sum().backward()
    assert torch.allclose(hard_plan.grad, dense_plan.grad, atol=1e-5)
    assert hard_plan.grad.abs().sum() > 0


def test_hard_columns_of_block_logits_is_the_identity_and_stays_in_blocks():
    logits = block_logits(32, 8, scale=1.0)
    assert torch.equal(hard_columns(logits), torch.arange(32))
    noisy = logits + torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    check_permutation(hard_columns(noisy), 32, block_size=8)
    with pytest.raises(ValueError, match="divide"):
        block_logits(30, 8, 1.0)


def test_soft_permutation_is_doubly_stochastic_and_temperature_anneals():
    plan = soft_permutation(torch.randn(2, 8, 8), temperature=0.5, iterations=50)
    assert torch.allclose(plan.sum(-1), torch.ones(2, 8), atol=1e-4)
    assert torch.allclose(plan.sum(-2), torch.ones(2, 8), atol=1e-4)
    assert annealed_temperature(0, 10, 1.0, 0.01) == pytest.approx(1.0)
    assert annealed_temperature(9, 10, 1.0, 0.01) == pytest.approx(0.01)
    assert annealed_temperature(0, 1, 1.0, 0.01) == pytest.approx(0.01)
