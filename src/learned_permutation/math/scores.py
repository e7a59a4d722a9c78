"""Pruning scores that mirror the pruner which follows the permutation.

Every score is equivariant under a permutation of the input channels
(``score(W[:, p]) == score(W)[:, p]``), so solvers compute it once and permute its columns.
"""

from __future__ import annotations

import torch

SCORE_KINDS = ("magnitude", "wanda", "wanda_energy", "ria", "sparsegpt")
RIA_ACTIVATION_EXPONENT = 0.5
SPARSEGPT_DAMPENING = 0.01  # SparseGPT's default: add 1% of the mean Hessian diagonal


def score(
    kind: str,
    weight: torch.Tensor,
    act_sq: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of every weight (higher = kept first), shape ``weight.shape``.

    ``act_sq`` is the sum of squared inputs per channel (``diag(X^T X)``); it is read from the
    Hessian's diagonal when only ``hessian`` is given. ``wanda_energy`` is Wanda's score squared,
    ``w^2 * ||x||^2``: it ranks a row's weights as Wanda does (the same N:M masks), but its sum over
    the pruned weights is the diagonal estimate of the output error they cause, so a solver that keeps
    the most of it minimises that error rather than Wanda's L1 proxy (like SparseGPT's own score).
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}; choose one of {SCORE_KINDS}")
    magnitude = weight.detach().float().abs()
    if kind == "magnitude":
        return magnitude
    if kind == "sparsegpt":
        return magnitude.square() / inverse_hessian_diagonal(weight.shape[1], act_sq, hessian)
    act_sq = _activation_energy(weight.shape[1], act_sq, hessian, kind)
    if kind == "wanda":
        return magnitude * act_sq.sqrt()
    if kind == "wanda_energy":
        return magnitude.square() * act_sq
    relative = magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(1e-12) + magnitude / magnitude.sum(
        dim=0, keepdim=True
    ).clamp_min(1e-12)
    return relative * act_sq.sqrt().pow(RIA_ACTIVATION_EXPONENT)


def inverse_hessian_diagonal(
    channels: int, act_sq: torch.Tensor | None, hessian: torch.Tensor | None
) -> torch.Tensor:
    """``diag(H_damped^-1)``: the denominator of the OBS saliency ``w^2 / [H^-1]_jj``.

    Damped like SparseGPT (1% of the mean diagonal; dead channels get a unit diagonal). Without a
    Hessian the diagonal ``act_sq`` stands in for it.
    """
    if hessian is None:
        diagonal = _activation_energy(channels, act_sq, None, "sparsegpt").clone()
        diagonal[diagonal == 0] = 1.0
        return 1.0 / (diagonal + SPARSEGPT_DAMPENING * diagonal.mean())
    damped = hessian.detach().float().clone()
    diagonal = damped.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal += SPARSEGPT_DAMPENING * diagonal.mean()
    factor, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        raise ValueError(
            "the Hessian is not positive definite even after 1% dampening; "
            "it must be X^T X of finite calibration inputs"
        )
    return torch.cholesky_inverse(factor).diagonal().clone()


def _activation_energy(
    channels: int, act_sq: torch.Tensor | None, hessian: torch.Tensor | None, kind: str
) -> torch.Tensor:
    if act_sq is not None:
        return act_sq.detach().float()
    if hessian is not None:
        return hessian.detach().float().diagonal().clone()
    raise ValueError(
        f"score {kind!r} needs input statistics: pass act_sq (sum of squared inputs per channel) "
        f"or the Hessian X^T X for all {channels} channels"
    )
