"""Permutation vectors: ``p[j]`` is the old channel that lands at new position ``j`` (``W_new = W[:, p]``)."""

from __future__ import annotations

import torch


def check_permutation(perm: torch.Tensor, size: int, block_size: int | None = None) -> None:
    """Raise ValueError unless ``perm`` is a permutation of ``size`` channels (inside blocks if given)."""
    if perm.dim() != 1 or perm.numel() != size:
        raise ValueError(f"permutation must be a vector of {size} channel indices, got shape {tuple(perm.shape)}")
    if perm.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"permutation must hold integer indices, got {perm.dtype}")
    seen = torch.zeros(size, dtype=torch.bool, device=perm.device)
    in_range = bool(((perm >= 0) & (perm < size)).all())
    if in_range:
        seen[perm.long()] = True
    if not in_range or not bool(seen.all()):
        raise ValueError(f"not a permutation of range({size}): indices repeat or fall outside it")
    if block_size is not None:
        check_block_size(size, block_size)
        position_block = torch.arange(size, device=perm.device) // block_size
        if not bool((perm.long() // block_size == position_block).all()):
            raise ValueError(f"permutation moves channels across blocks of {block_size} contiguous channels")


def check_block_size(size: int, block_size: int) -> None:
    if block_size <= 0 or size % block_size:
        raise ValueError(f"block_size {block_size} must be positive and divide the channel count {size}")
