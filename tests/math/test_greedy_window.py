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


def test_greedy_and_ria_do_not_depend_on_the_broadcast_chunk_size(monkeypatch):
    """The GPU's large chunks (one launch per 64 MiB) give the permutations the CPU's cache-sized chunks give."""
    from learned_permutation.math import solve_site
    from learned_permutation.math.solvers import greedy, retained

    generator = torch.Generator().manual_seed(1)
    problem = SiteProblem([Consumer(weight=torch.randn(96, 256, generator=generator),
                                    act_sq=torch.rand(256, generator=generator) + 0.1)], 2, 4, "wanda")
    found = {}
    for elements in (1 << 10, 1 << 24):  # several slots per chunk at most vs every slot in one chunk
        monkeypatch.setattr(retained, "chunk_elements", lambda device, elements=elements: elements)
        monkeypatch.setattr(greedy, "chunk_elements", lambda device, elements=elements: elements)
        found[elements] = [solve_site(problem, method, rows=96) for method in ("greedy", "ria")]
    for small, large in zip(*found.values()):
        assert torch.equal(small, large)
