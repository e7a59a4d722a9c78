"""The greedy solver's incremental window bookkeeping equals recomputing it from scratch."""

from __future__ import annotations

import torch

from learned_permutation.math.objectives import Consumer, SiteProblem
from learned_permutation.math.solvers.greedy import GroupRetained, WindowValues, solve_greedy


def _problem(seed: int, rows: int, channels: int) -> SiteProblem:
    generator = torch.Generator().manual_seed(seed)
    return SiteProblem([Consumer(weight=torch.randn(rows, channels, generator=generator),
                                 act_sq=torch.rand(channels, generator=generator) + 0.1)], 2, 4, "wanda")


def test_window_values_after_moves_equal_a_fresh_computation():
    problem = _problem(0, 40, 96)
    scores = problem.consumers[0].score
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    positions = torch.stack([torch.arange(8, 40), torch.arange(56, 88)])  # two windows of 8 groups
    batch = WindowValues(problem, scores, perm, positions)
    # (batch window, local position) swaps: in both windows; in the second only (the first leaves the
    # batch); then one inside a group of what is now window 0
    for moves in [[(0, 0, 9), (1, 3, 30), (1, 4, 5)], [(1, 2, 31)], [(0, 17, 18)]]:
        for window, first, second in moves:
            a, b = batch.positions[window, first], batch.positions[window, second]
            perm[a], perm[b] = perm[b].clone(), perm[a].clone()
        windows = torch.tensor([w for w, _, _ in moves for _ in range(2)])
        batch.update(perm, windows, torch.tensor([p for _, *pair in moves for p in pair]))
        fresh = WindowValues(problem, scores, perm, batch.positions)  # the windows still in the batch
        assert len(batch.positions) == len(set(w for w, _, _ in moves))
        assert torch.allclose(batch.values, fresh.values, rtol=1e-5)
        assert torch.allclose(batch.current, fresh.current, rtol=1e-5)
        assert torch.equal(batch.slot_threshold, fresh.slot_threshold)


def test_group_sums_read_the_sites_own_scores_without_a_copy():
    """A site's scores are held once, channel-major, and greedy's group sums read them in place: a second,
    transposed copy was the modifier's peak on a quarter of Llama-3.2-1B's layer
    (results/scale/layer_pass_memory.md)."""
    problem = _problem(1, 48, 64)
    score = problem.consumers[0].score
    assert score.T.is_contiguous()
    retained = GroupRetained(problem, torch.arange(64))
    assert retained.columns[0].data_ptr() == score.data_ptr()
    groups = torch.arange(64).reshape(-1, 4)
    assert torch.allclose(retained.values, score.T[groups].topk(2, dim=1).values.sum(dim=(1, 2)).double())


def test_windows_in_lockstep_give_the_permutation_of_one_window_at_a_time():
    """The accelerator's lockstep (every window of a sweep per round) decides as the CPU's window-by-window
    sweep does: windows are disjoint, so neither sees the other's swaps; blocks give windows of two lengths."""
    problem = _problem(2, 64, 384)
    for block_size in (None, 128):
        alone = solve_greedy(problem, block_size, window=96, sweeps=2, lockstep=1)
        together = solve_greedy(problem, block_size, window=96, sweeps=2, lockstep=1000)
        assert torch.equal(alone, together)
        assert not torch.equal(alone, torch.arange(384))  # it swapped something


def test_greedy_and_ria_do_not_depend_on_the_broadcast_chunk_size(monkeypatch):
    """The GPU's large chunks (one launch per 64 MiB) give the permutations the CPU's cache-sized chunks give."""
    from learned_permutation.math import solve_site
    from learned_permutation.math.solvers import greedy, retained

    problem = _problem(1, 96, 256)
    found = {}
    for elements in (1 << 10, 1 << 24):  # several slots per chunk at most vs every slot in one chunk
        monkeypatch.setattr(retained, "chunk_elements", lambda device, elements=elements: elements)
        monkeypatch.setattr(greedy, "chunk_elements", lambda device, elements=elements: elements)
        found[elements] = [solve_site(problem, method, rows=96) for method in ("greedy", "ria")]
    for small, large in zip(*found.values()):
        assert torch.equal(small, large)


def test_ria_reassigns_windows_together_as_it_would_one_at_a_time(monkeypatch):
    """On a GPU ``ria`` re-assigns a slot in several windows at once; blocks give windows of two lengths
    (96 and 32 channels), which are batched separately."""
    from learned_permutation.math import solve_site
    from learned_permutation.math.solvers import heuristics

    problem = _problem(1, 96, 256)
    found = {}
    for elements in (1, 1 << 24):  # one window per batch vs every window of a length in one
        monkeypatch.setattr(heuristics, "chunk_elements", lambda device, elements=elements: elements)
        found[elements] = [solve_site(problem, "ria", block_size=block, rows=96, lsa_groups=24) for block in (None, 128)]
    for alone, together in zip(*found.values()):
        assert torch.equal(alone, together)
    assert len(heuristics._equal_sized_batches(heuristics.group_windows([range(0, 128), range(128, 256)], 4, 96), 8)) == 4


def test_one_slots_statistics_are_that_slots_column_of_all_slots():
    from learned_permutation.math.solvers.retained import slot_statistics

    grouped = torch.rand(3, 5, 8, 4, generator=torch.Generator().manual_seed(0))
    every_top, every_threshold = slot_statistics(grouped, 2)
    top, threshold = slot_statistics(grouped, 2, [2])
    assert torch.equal(top[..., 0], every_top[..., 2]) and torch.equal(threshold[..., 0], every_threshold[..., 2])


def test_on_a_cpu_windows_share_the_callers_threads_and_decide_as_on_one(monkeypatch):
    """With two caller threads, two windows are improved at the same time (each waits for the other at a
    barrier: run one after the other, the first would wait in vain), and ``greedy`` and ``ria`` find the
    permutations they find on one thread."""
    import threading

    from learned_permutation.math import solve_site
    from learned_permutation.math.solvers import greedy

    problem = _problem(3, 64, 512)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [solve_site(problem, "greedy", window=128), solve_site(problem, "ria", lsa_groups=32)]
        barrier, improve, arrivals = threading.Barrier(2, timeout=10), greedy._improve_windows, []

        def meeting(*args):
            if len(arrivals) < 2:  # the first two windows wait for each other
                arrivals.append(threading.get_ident())
                barrier.wait()
            return improve(*args)

        monkeypatch.setattr(greedy, "_improve_windows", meeting)
        torch.set_num_threads(2)
        with torch.inference_mode():  # thread-local: the workers write the caller's inference tensors
            problem = _problem(3, 64, 512)
            two = [solve_site(problem, "greedy", window=128), solve_site(problem, "ria", lsa_groups=32)]
    finally:
        torch.set_num_threads(previous)
    assert len(set(arrivals)) == 2
    for alone, shared in zip(one, two):
        assert torch.equal(alone, shared)
