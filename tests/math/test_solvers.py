from __future__ import annotations

import pytest
import torch

from learned_permutation.math import Consumer, reconstruction_error, retained_score, solve_permutation
from learned_permutation.math.permutations import check_permutation

FAST_LEARNED = {"rounds": 2, "steps": 4, "polish_iters": 3, "group_size": 16}


def _knobs(method: str) -> dict:
    return FAST_LEARNED if method == "learned" else {}


@pytest.mark.parametrize("method", ["identity", "ria", "greedy", "learned"])
@pytest.mark.parametrize("block_size", [None, 8, 16])
def test_solvers_return_valid_permutations(method, block_size, make_consumer):
    consumers = [make_consumer(6, 32, seed=1)[0]]
    perm = solve_permutation(consumers, 2, 4, "wanda", method, block_size=block_size, **_knobs(method))
    check_permutation(perm, 32, block_size)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_heuristics_beat_identity_on_their_objective(n, m, make_consumer):
    consumers = [make_consumer(8, 32, seed=2)[0]]
    identity = retained_score(consumers, torch.arange(32), n, m, "wanda")
    for method in ("ria", "greedy"):
        perm = solve_permutation(consumers, n, m, "wanda", method)
        assert retained_score(consumers, perm, n, m, "wanda") > identity, method


@pytest.mark.parametrize("init", ["identity", "ria", "greedy"])
def test_learned_never_worse_than_its_init(init, make_consumer):
    consumers = [make_consumer(8, 32, seed=3)[0], make_consumer(4, 32, seed=4)[0]]
    start = solve_permutation(consumers, 2, 4, "sparsegpt", init)
    learned = solve_permutation(consumers, 2, 4, "sparsegpt", "learned", init=init, **FAST_LEARNED)
    assert reconstruction_error(consumers, learned, 2, 4, "sparsegpt") <= reconstruction_error(
        consumers, start, 2, 4, "sparsegpt"
    )


def test_learned_improves_on_greedy_with_correlated_inputs(make_consumer):
    consumers = [make_consumer(16, 48, seed=6)[0]]
    greedy = solve_permutation(consumers, 2, 4, "wanda", "greedy")
    learned = solve_permutation(consumers, 2, 4, "wanda", "learned", init="greedy", **FAST_LEARNED)
    assert reconstruction_error(consumers, learned, 2, 4, "wanda") < reconstruction_error(consumers, greedy, 2, 4, "wanda")


@pytest.mark.parametrize("method", ["ria", "greedy", "learned"])
def test_same_seed_same_permutation(method, make_consumer):
    consumers = [make_consumer(6, 32, seed=8)[0]]
    first = solve_permutation(consumers, 2, 4, "ria", method, seed=3, **_knobs(method))
    second = solve_permutation(consumers, 2, 4, "ria", method, seed=3, **_knobs(method))
    assert torch.equal(first, second)


def test_learned_works_with_diagonal_statistics_only(make_consumer):
    consumer = make_consumer(6, 32, seed=9)[0]
    diagonal = [Consumer(consumer.weight, act_sq=consumer.act_sq)]
    perm = solve_permutation(diagonal, 2, 4, "wanda", "learned", **FAST_LEARNED)
    check_permutation(perm, 32)


def test_solver_errors(make_consumer):
    consumers = [make_consumer(4, 16)[0]]
    with pytest.raises(ValueError, match="unknown permutation method"):
        solve_permutation(consumers, 2, 4, "wanda", "annealing")
    with pytest.raises(ValueError, match="unknown score kind"):
        solve_permutation(consumers, 2, 4, "owl", "greedy")
    with pytest.raises(ValueError, match="not divisible by M=8"):
        solve_permutation([make_consumer(4, 12)[0]], 4, 8, "wanda", "greedy")
    with pytest.raises(ValueError, match="block_size 6"):
        solve_permutation(consumers, 2, 4, "wanda", "greedy", block_size=6)
    with pytest.raises(ValueError, match="unknown init"):
        solve_permutation(consumers, 2, 4, "wanda", "learned", init="random")
