"""CPU thread policy of the solvers: small ops on one thread, large dense products on the caller's threads.

The solvers run thousands of small tensor ops (swap gains on windows of a few hundred channels,
per-segment losses, Sinkhorn steps). With several intra-op threads each op pays an OpenMP
fork/join, and on shared cores a descheduled worker stalls that barrier for a whole time slice:
measured on 2 shared cores, a chunked ``relu``-sum kernel ran 10x to 1000x slower on 2 threads than
on 1. So ``solver_threads`` runs a solver on one thread and ``dense_threads`` gives the caller's
thread count back to the few large products (``dW @ H`` over all output rows), where threads pay off.
Both only change ``torch.set_num_threads`` and restore it on exit; they are no-ops for a caller
already on one thread. The caller's other cores are used at a coarser grain instead: independent
pieces of a solve (disjoint windows of channels) run side by side in Python threads, each on one
intra-op thread, with no barrier between them (``independent_map``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

_caller_threads: int | None = None  # the caller's thread count while a solver runs


@contextmanager
def solver_threads() -> Iterator[None]:
    """Run the enclosed solver on one CPU thread (re-entrant)."""
    global _caller_threads
    if _caller_threads is not None:
        yield
        return
    previous = torch.get_num_threads()
    _caller_threads = previous
    if previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        _caller_threads = None
        if previous > 1:
            torch.set_num_threads(previous)


@contextmanager
def dense_threads() -> Iterator[None]:
    """Inside ``solver_threads``: the caller's thread count for one large dense product."""
    threads = _caller_threads
    if threads is None or threads <= 1:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def independent_map(function: Callable, items: Iterable, device: torch.device | str) -> list:
    """``[function(item) for item in items]``, for items whose work touches disjoint data: inside
    ``solver_threads`` on a CPU, on as many Python threads as the caller had intra-op threads (torch ops
    release the GIL), each running its ops on one thread; elsewhere in order (an accelerator batches
    the items itself)."""
    items = list(items)
    workers = min(len(items), _caller_threads or 1)
    if workers <= 1 or torch.device(device).type != "cpu":
        return [function(item) for item in items]

    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def one_thread(item):
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread: set it in this worker too
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):  # both are thread-local too
            return function(item)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one_thread, items))
