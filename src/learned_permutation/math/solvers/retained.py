"""Retained-score bookkeeping shared by the heuristic solvers.

For a group whose slot ``s`` is emptied, the top-N sum after inserting a channel with score ``x``
is ``T + relu(x - t)``, where ``T`` is the top-N sum of the M-1 remaining channels and ``t`` their
N-th largest score. That identity turns "value of every channel in every slot" into one broadcast.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 18  # broadcast temporaries that stay in cache: ~10x faster than large chunks on CPU
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24  # on a GPU every chunk is a kernel launch: 64 MiB fp32 temporaries, few launches


def chunk_elements(device: torch.device | str) -> int:
    """Elements of one broadcast temporary on ``device``: cache-sized on CPU, launch-amortising elsewhere."""
    return CHUNK_ELEMENTS if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def slot_statistics(grouped: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For scores ``[rows, groups, M]``: per slot, top-N sum ``T`` and N-th largest ``t`` of the other slots."""
    m = grouped.shape[-1]
    others_index = torch.tensor(
        [[k for k in range(m) if k != slot] for slot in range(m)], device=grouped.device
    )
    others = grouped[..., others_index].sort(dim=-1, descending=True).values  # [rows, groups, M, M-1]
    return others[..., :n].sum(dim=-1), others[..., n - 1]


def group_retained(grouped: torch.Tensor, n: int) -> torch.Tensor:
    """Top-N sum per group, summed over rows: ``[groups]``."""
    return grouped.topk(n, dim=-1).values.sum(dim=-1).sum(dim=0)


def insertion_values(slot_top: torch.Tensor, slot_threshold: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``V[i, c]``: retained score (summed over rows) of slot i's group when channel column c fills slot i.

    ``slot_top``/``slot_threshold``: ``[rows, slots]``; ``candidates``: ``[rows, channels]``. The sum over
    rows runs along contiguous memory (channel-major copies), a few slots at a time: twice as fast on
    CPU as broadcasting row chunks and accumulating ``[slots, channels]`` partial sums.
    """
    rows, slots = slot_top.shape
    by_channel, thresholds = candidates.T.contiguous(), slot_threshold.T.contiguous()
    values = slot_top.sum(dim=0)[:, None].expand(slots, candidates.shape[1]).clone()
    step = max(1, chunk_elements(candidates.device) // max(1, rows * candidates.shape[1]))
    buffer = by_channel.new_empty(min(step, slots), *by_channel.shape)
    for start in range(0, slots, step):
        part = buffer[: min(step, slots - start)]
        torch.sub(by_channel[None], thresholds[start : start + step, None], out=part)
        values[start : start + step] += part.clamp_min_(0).sum(dim=-1)
    return values
