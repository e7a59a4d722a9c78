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


def slot_statistics(grouped: torch.Tensor, n: int, slots: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For scores ``[rows, groups, M]``: per slot (of ``slots``, default all), top-N sum ``T`` and N-th largest
    ``t`` of the other slots. One slot's costs ``1 / M`` of all slots' temporaries."""
    m = grouped.shape[-1]
    others_index = torch.tensor(
        [[k for k in range(m) if k != slot] for slot in (range(m) if slots is None else slots)], device=grouped.device
    )
    others = grouped[..., others_index].sort(dim=-1, descending=True).values  # [rows, groups, M, M-1]
    return others[..., :n].sum(dim=-1), others[..., n - 1]


def group_retained(grouped: torch.Tensor, n: int) -> torch.Tensor:
    """Top-N sum per group, summed over rows: ``[..., groups]`` for scores ``[..., rows, groups, M]``."""
    return row_sums(grouped.topk(n, dim=-1).values.sum(dim=-1))


def row_sums(values: torch.Tensor) -> torch.Tensor:
    """``[..., columns]`` sums over the rows of ``[..., rows, columns]``, each column summed along contiguous
    memory: a column's float32 sum then does not depend on how many columns are summed with it (a sum over
    strided rows does), so a window batch decides as the windows would one at a time."""
    return values.transpose(-1, -2).contiguous().sum(dim=-1)


def insertion_values(slot_top: torch.Tensor, slot_threshold: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``V[..., i, c]``: retained score (summed over rows) of slot i's group when channel column c fills slot i.

    ``slot_top``/``slot_threshold``: ``[..., rows, slots]``; ``candidates``: ``[..., rows, channels]`` (leading
    dims: independent windows). The sum over rows runs along contiguous memory (channel-major copies), a
    few slots of a few windows at a time: twice as fast on CPU as broadcasting row chunks and accumulating
    ``[slots, channels]`` partial sums.
    """
    leading = candidates.shape[:-2]
    rows, slots = slot_top.shape[-2:]
    channels = candidates.shape[-1]
    by_channel = candidates.reshape(-1, rows, channels).transpose(1, 2).contiguous()  # [windows, channels, rows]
    thresholds = slot_threshold.reshape(-1, rows, slots).transpose(1, 2).contiguous()  # [windows, slots, rows]
    windows = by_channel.shape[0]
    values = row_sums(slot_top.reshape(-1, rows, slots))[:, :, None].expand(windows, slots, channels).clone()
    step = max(1, chunk_elements(candidates.device) // max(1, rows * channels))  # (window, slot) pairs per chunk
    slot_step, window_step = min(step, slots), max(1, step // max(1, slots))  # whole windows when they fit
    buffer = by_channel.new_empty(min(window_step, windows), slot_step, channels, rows)
    for first in range(0, windows, window_step):
        chunk = slice(first, first + window_step)
        channel_rows, slot_rows, totals = by_channel[chunk, None], thresholds[chunk, :, None], values[chunk]
        chunk_buffer = buffer[: totals.shape[0]]
        for start in range(0, slots, slot_step):
            part = chunk_buffer[:, : min(slot_step, slots - start)]
            torch.sub(channel_rows, slot_rows[:, start : start + slot_step], out=part)
            totals[:, start : start + slot_step] += part.clamp_min_(0).sum(dim=-1)
    return values.reshape(*leading, slots, channels)
