"""N:M masks along the input (last) dimension."""

from __future__ import annotations

import re

import torch

from .threads import solver_threads

_MASK_STRUCTURE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_mask_structure(structure: str) -> tuple[int, int]:
    """Parse "N:M" (keep N of every M consecutive input weights) into (N, M)."""
    match = _MASK_STRUCTURE.match(str(structure))
    if match is None:
        raise ValueError(
            f"mask structure {structure!r} is not of the form 'N:M' (e.g. '2:4'); "
            "in YAML quote it ('2:4'), unquoted it parses as a number"
        )
    n, m = int(match.group(1)), int(match.group(2))
    check_nm(n, m)
    return n, m


def check_nm(n: int, m: int) -> None:
    """Only 1 <= N < M describes a real N:M sparsity pattern."""
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= N < M, got {n}:{m}")


def check_divisible(size: int, m: int, what: str = "channel count") -> None:
    if size % m:
        raise ValueError(
            f"{what} {size} is not divisible by M={m}: N:M groups of {m} consecutive "
            f"channels cannot tile it; choose an M that divides {size} or leave this layer dense"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the top-n scores of every m consecutive entries of the last dim.

    Equal scores are common (weights that come from 4-bit quantization share magnitudes), so ties are
    broken deterministically: among equal scores the earlier entry is kept (a stable sort)."""
    check_nm(n, m)
    check_divisible(scores.shape[-1], m, "last dimension")
    grouped = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    # Each entry's rank in its group is how many entries beat it (a larger score, or an equal one earlier),
    # counted by M x (M - 1) element-wise comparisons of whole slot columns: the mask a stable sort gives,
    # about 3x faster than sorting for M = 4 (``benchmarks/kernel_speed.py``), on one CPU thread (small
    # element-wise ops stall on a busy machine's OpenMP barriers: ``math/threads.py``).
    slots = grouped.unbind(dim=-1)
    kept = []
    with solver_threads():
        for i, entry in enumerate(slots):
            rank = torch.zeros_like(entry, dtype=torch.uint8)
            for j, other in enumerate(slots):
                if j != i:
                    rank += (other >= entry) if j < i else (other > entry)
            kept.append(rank < n)
        return torch.stack(kept, dim=-1).reshape(scores.shape)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` bool -> ``[R, ceil(C / 8)]`` uint8, bit ``j`` of byte ``k`` being column ``8k + j`` (numpy's
    ``bitorder='little'``, compressed-tensors' bitmask layout): a mask in 1/32 of its fp32 weight's memory."""
    rows, cols = bits.shape
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, (-cols) % 8)).view(rows, -1, 8)
    return (padded << _bit_shifts(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """``pack_bits``' inverse: the ``[R, cols]`` bool mask."""
    bits = (packed.unsqueeze(-1) >> _bit_shifts(packed.device)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)
