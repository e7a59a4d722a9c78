"""Seconds of the default method's inner kernels on real layer shapes, in one process (compare rows, not runs).

Per shape (``down_proj`` of SmolLM2-135M, 576 x 1536, and of Llama-3.2-1B, 2048 x 8192; random weights and
input energies): ``greedy`` as ``select`` runs it (1,024 rows, one sweep), its windows improved one at a time
(the CPU's default) and all in lockstep (an accelerator's), with the number of sequential swap rounds each
needs (the permutations are checked equal), and ``ria`` on one prepared site; and the N:M mask of the whole
weight by ``nm_mask`` next to a stable sort of each group (the implementation
``nm_mask`` replaced; the masks are checked equal). Solvers and masks run on one intra-op thread, as in the
modifier; with ``--threads 1 2`` each shape is timed for a caller with 1 and with 2 threads, among which a
CPU solve shares its windows (``math/threads.py``; the permutations are checked equal to the first count's).

    python benchmarks/kernel_speed.py            # about 1 minute on 2 cores
    python benchmarks/kernel_speed.py --threads 1 2
    python benchmarks/kernel_speed.py --device cuda --lockstep-only   # on a GPU (benchmarks/device_checks.sh)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from learned_permutation.math import Consumer, SiteProblem, nm_mask, solve_site
from learned_permutation.math.solvers import greedy as greedy_solver

SHAPES = {"SmolLM2-135M down_proj": (576, 1536), "Llama-3.2-1B down_proj": (2048, 8192)}


def sorted_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask by a stable descending sort of every group (the reference ``nm_mask`` must equal)."""
    grouped = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    kept = grouped.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, kept, True).reshape(scores.shape)


def seconds(work, repeats: int) -> float:
    """Best of ``repeats`` wall times of ``work()`` (device work included: synchronised before the clock)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def greedy_run(problem: SiteProblem, lockstep: int) -> tuple[float, int, torch.Tensor]:
    """Seconds, sequential swap rounds and permutation of ``greedy`` as ``select`` runs it."""
    rounds, swap_round = 0, greedy_solver._swap_round

    def counted(*args):
        nonlocal rounds
        rounds += 1
        return swap_round(*args)

    greedy_solver._swap_round = counted
    try:
        found = []
        elapsed = seconds(lambda: found.append(solve_site(problem, "greedy", rows=1024, sweeps=1, lockstep=lockstep)), 1)
    finally:
        greedy_solver._swap_round = swap_round
    return elapsed, rounds, found[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per kernel")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lockstep-only", action="store_true",
                        help="skip greedy's one-window-at-a-time order (on a GPU it is minutes of small launches)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="the caller's CPU thread counts to time (a CPU solve shares its windows among them)")
    args = parser.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'CPU'}")
    print("| shape | caller threads | greedy (1024 rows, 1 sweep), one window at a time: s / rounds | windows in lockstep: s / rounds "
          "| ria s | nm_mask ms | stable-sort mask ms |")
    print("|---|---|---|---|---|---|---|")
    for name, (rows, columns) in SHAPES.items():
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(rows, columns, generator=generator) * 0.02
        energy = torch.rand(columns, generator=generator).square() * 100
        problem = SiteProblem([Consumer(weight.to(args.device), act_sq=energy.to(args.device))], 2, 4, "wanda")
        solve_site(problem, "ria")  # warm-up: kernel loading and allocator stay out of the timings
        first: list[torch.Tensor] = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(shape_row(f"{name} {rows} x {columns}", problem, threads, first, args), flush=True)
    return 0


def shape_row(name: str, problem: SiteProblem, threads: int, first: list[torch.Tensor], args) -> str:
    """One table row for a caller with ``threads`` threads; ``first``: the first thread count's
    permutations (filled on the first call), which every later count must reproduce."""
    together, together_rounds, together_perm = greedy_run(problem, lockstep=1 << 30)
    alone = "skipped"
    if not args.lockstep_only:
        seconds_alone, rounds_alone, alone_perm = greedy_run(problem, lockstep=1)
        if not torch.equal(alone_perm, together_perm):
            raise SystemExit(f"{name}: greedy's windows in lockstep chose another permutation")
        alone = f"{seconds_alone:.2f} / {rounds_alone}"
    found = []
    ria = seconds(lambda: found.append(solve_site(problem, "ria")), 1)
    if not first:
        first += [together_perm, found[0]]
    elif not (torch.equal(first[0], together_perm) and torch.equal(first[1], found[0])):
        raise SystemExit(f"{name}: {threads} caller threads chose other permutations than {args.threads[0]}")
    scores = problem.consumers[0].score
    if not torch.equal(nm_mask(scores, 2, 4), sorted_mask(scores, 2, 4)):
        raise SystemExit(f"{name}: nm_mask differs from the stable-sort mask")
    mask = seconds(lambda: nm_mask(scores, 2, 4), args.repeats) * 1000
    reference = seconds(lambda: sorted_mask(scores, 2, 4), args.repeats) * 1000
    return (f"| {name} | {threads} | {alone} | {together:.2f} / {together_rounds} "
            f"| {ria:.2f} | {mask:.1f} | {reference:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
