"""The greedy solver's incremental window bookkeeping equals recomputing it from scratch."""

from __future__ import annotations

import torch

from learned_permutation.math.objectives import Consumer, SiteProblem
from learned_permutation.math.solvers.greedy import WindowValues


def test_window_values_after_moves_equal_a_fresh_computation():
    generator = torch.Generator().manual_seed(0)
    problem = SiteProblem([Consumer(weight=torch.randn(40, 64, generator=generator),
                                    act_sq=torch.rand(64, generator=generator) + 0.1)], 2, 4, "wanda")
    scores = problem.consumers[0].score
    perm = torch.randperm(64, generator=generator)
    positions = torch.arange(8, 40)  # a window of 8 groups
    window = WindowValues(problem, scores, perm, positions)
    for first, second in [(0, 9), (3, 30), (17, 18)]:  # window-local swaps, one inside a group
        a, b = positions[first], positions[second]
        perm[a], perm[b] = perm[b].clone(), perm[a].clone()
        window.update(perm, torch.tensor([first, second]))
        fresh = WindowValues(problem, scores, perm, positions)
        assert torch.allclose(window.values, fresh.values, rtol=1e-5)
        assert torch.allclose(window.current, fresh.current, rtol=1e-5)
        assert torch.equal(window.slot_threshold, fresh.slot_threshold)
