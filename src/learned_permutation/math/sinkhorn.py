"""Differentiable relaxation of permutations: log-domain Sinkhorn, and its hard counterpart."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def log_sinkhorn(logits: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """Log of a (nearly) doubly stochastic matrix ``diag(u) exp(logits / T) diag(v)``, batched over leading dims.

    Normalising in the log domain keeps low temperatures (close to a hard permutation) stable.
    """
    log_plan = logits / temperature
    for _ in range(iterations):
        log_plan = log_plan - log_plan.logsumexp(dim=-1, keepdim=True)
        log_plan = log_plan - log_plan.logsumexp(dim=-2, keepdim=True)
    return log_plan


def hard_permutation(log_plan: torch.Tensor) -> torch.Tensor:
    """Permutation matrices maximising ``<P, log_plan>`` per batch entry (Hungarian / linear assignment).

    Sinkhorn's row and column scalings add a constant to every permutation's total, so this is the
    assignment of the raw logits too: the hard permutation does not depend on the temperature.
    """
    batch = log_plan.detach().reshape(-1, *log_plan.shape[-2:]).cpu().double().numpy()
    size = batch.shape[-1]
    matrices = np.zeros_like(batch, dtype=np.float32)
    for index, matrix in enumerate(batch):
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        matrices[index, rows, cols] = 1.0
    return torch.from_numpy(matrices).reshape(log_plan.shape).to(log_plan.device, log_plan.dtype)
