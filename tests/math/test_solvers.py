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


@pytest.mark.parametrize("method", ["identity", "ria", "greedy", "learned"])
@pytest.mark.parametrize("n, m, block_size", [(4, 8, None), (4, 8, 16), (1, 4, None), (1, 4, 8)])
def test_solvers_valid_for_other_structures(method, n, m, block_size, make_consumer):
    consumers = [make_consumer(6, 32, seed=11)[0]]
    perm = solve_permutation(consumers, n, m, "wanda", method, block_size=block_size, **_knobs(method))
    check_permutation(perm, 32, block_size)


@pytest.mark.parametrize("block_size", [None, 16])
def test_learned_never_worse_than_a_given_permutation(block_size, make_consumer):
    consumers = [make_consumer(8, 32, seed=12)[0]]
    generator = torch.Generator().manual_seed(5)
    domain = block_size or 32
    start = torch.cat([torch.randperm(domain, generator=generator) + offset for offset in range(0, 32, domain)])
    learned = solve_permutation(consumers, 2, 4, "wanda", "learned", block_size=block_size, init=start, **FAST_LEARNED)
    check_permutation(learned, 32, block_size)
    assert reconstruction_error(consumers, learned, 2, 4, "wanda") <= reconstruction_error(consumers, start, 2, 4, "wanda")


def test_learned_from_best_init_never_worse_than_any_heuristic(make_consumer):
    consumers = [make_consumer(8, 32, seed=13)[0]]
    learned = reconstruction_error(consumers, solve_permutation(consumers, 4, 8, "wanda", "learned", **FAST_LEARNED), 4, 8, "wanda")
    for method in ("identity", "ria", "greedy"):
        start = solve_permutation(consumers, 4, 8, "wanda", method)
        assert learned <= reconstruction_error(consumers, start, 4, 8, "wanda"), method


@pytest.mark.parametrize("block_size", [None, 16])
def test_same_seed_same_learned_permutation_within_blocks(block_size, make_consumer):
    consumers = [make_consumer(6, 32, seed=14)[0]]
    first, second = (
        solve_permutation(consumers, 2, 4, "sparsegpt", "learned", block_size=block_size, seed=7, **FAST_LEARNED)
        for _ in range(2)
    )
    assert torch.equal(first, second)


def test_channel_count_not_divisible_by_m_is_a_clear_error(make_consumer):
    consumer = make_consumer(4, 12)[0]
    for method in ("identity", "ria", "greedy", "learned"):
        with pytest.raises(ValueError, match="12 is not divisible by M=8"):
            solve_permutation([consumer], 4, 8, "wanda", method)
    with pytest.raises(ValueError, match="not divisible by M=8"):
        reconstruction_error([consumer], torch.arange(12), 4, 8, "wanda")
    with pytest.raises(ValueError, match="multiple of M=8"):
        solve_permutation([make_consumer(4, 32)[0]], 4, 8, "wanda", "greedy", block_size=4)


@pytest.mark.parametrize("moved", [8, 24])  # few moved channels (Hessian rows) and most (full width)
@pytest.mark.parametrize("diagonal", [False, True])
def test_learned_incremental_update_matches_recomputation(moved, diagonal, make_consumer):
    from learned_permutation.math.objectives import SiteProblem
    from learned_permutation.math.solvers import learned

    consumer = make_consumer(6, 32, seed=15)[0]
    if diagonal:
        consumer = Consumer(consumer.weight, act_sq=consumer.act_sq)
    prepared = SiteProblem([consumer], 2, 4, "wanda").consumers[0]
    generator = torch.Generator().manual_seed(2)
    perm = torch.randperm(32, generator=generator)
    state = learned._consumer_state(prepared, perm, 2, 4)
    positions = torch.arange(4, 4 + moved)  # whole 4-groups
    candidate = perm.clone()
    candidate[positions] = perm[positions][torch.randperm(moved, generator=generator)]
    learned._update(state, candidate, positions, 2, 4).apply(state)
    fresh = learned._consumer_state(prepared, candidate, 2, 4)
    assert torch.equal(state.delta, fresh.delta)
    assert torch.allclose(state.product, fresh.product, rtol=1e-4, atol=1e-3)
    assert state.error == pytest.approx(fresh.error, rel=1e-5)
