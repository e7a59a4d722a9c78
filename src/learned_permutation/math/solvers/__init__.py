"""Permutation solvers: ``solve_permutation`` dispatches on ``method``."""

from __future__ import annotations

import torch

from ..objectives import Consumer, SiteProblem
from ..permutations import check_block_size, check_permutation
from ..threads import solver_threads
from .greedy import solve_greedy
from .heuristics import solve_identity, solve_ria
from .learned import solve_learned

HEURISTIC_SOLVERS = {"identity": solve_identity, "ria": solve_ria, "greedy": solve_greedy}
SOLVERS = {**HEURISTIC_SOLVERS, "learned": solve_learned}


def solve_permutation(
    consumers: list[Consumer],
    n: int,
    m: int,
    score_kind: str,
    method: str = "learned",
    block_size: int | None = None,
    **knobs,
) -> torch.Tensor:
    """Permutation ``p`` of the site's channels (``W_new = W[:, p]``) chosen by ``method``.

    With ``block_size`` every channel stays in its block of ``block_size`` contiguous channels.
    ``knobs`` go to the solver (see each ``solve_*`` for their meaning). On CPU the solver runs on
    one thread except for its large dense products (see ``learned_permutation.math.threads``).
    """
    return solve_site(SiteProblem(consumers, n, m, score_kind), method, block_size, **knobs)


def solve_site(problem: SiteProblem, method: str, block_size: int | None = None, **knobs) -> torch.Tensor:
    """``solve_permutation`` on a prepared problem, so several solvers share its scores (a SparseGPT
    score inverts each consumer's Hessian once)."""
    if method not in SOLVERS:
        raise ValueError(f"unknown permutation method {method!r}; choose one of {list(SOLVERS)}")
    if block_size is not None:
        check_block_size(problem.channels, block_size)
        if block_size % problem.m:
            raise ValueError(f"block_size {block_size} must be a multiple of M={problem.m} so blocks hold whole groups")
    with solver_threads():
        perm = SOLVERS[method](problem, block_size, **knobs)
    check_permutation(perm, problem.channels, block_size)
    return perm
