"""What the pruner that follows really leaves of a Linear, for a candidate column order.

A per-layer site (``mlp``, ``attn_vo``) changes only the input-column order of its consumer
(``down_proj``, ``o_proj``). Its candidates are judged by the output error the pruner itself would
leave on that Linear, ``tr((W - W_pruned) H (W - W_pruned)^T)`` with ``H = X^T X`` of the layer's
calibration inputs: with Wanda the pruned weight is Wanda's N:M mask in the candidate's order; with
SparseGPT it is SparseGPT's OBS result (``learned_permutation.math.obs``, the procedure of
llm-compressor's ``sparsify_weight`` with the pruner's block size and dampening, batched over the
candidates) on the permuted weight and Hessian, so the re-fit of the kept weights, which a mask-only
score cannot see, decides too. Cost: about one pruner call on the Linear for all candidates together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learned_permutation.math import nm_mask
from learned_permutation.math.obs import obs_prune
from learned_permutation.math import score as pruning_score

__all__ = ["PrunerModel", "pruned_output_errors"]


@dataclass(frozen=True)
class PrunerModel:
    """How the following pruner prunes one Linear: ``score`` (``sparsegpt`` means SparseGPT's OBS
    update, any other score a mask by that score), the N:M pattern and SparseGPT's own knobs."""

    score: str
    n: int
    m: int
    block_size: int = 128
    dampening_frac: float = 0.01

    @classmethod
    def following(cls, pruner, score: str, n: int, m: int) -> PrunerModel:
        """The model of ``pruner`` (a SparseGPT/Wanda modifier or None) pruning by ``score``."""
        if score == "sparsegpt" and pruner is not None and hasattr(pruner, "dampening_frac"):
            return cls(score, n, m, int(pruner.block_size), float(pruner.dampening_frac))
        return cls(score, n, m)

    def prune(self, weights: torch.Tensor, hessians: torch.Tensor) -> torch.Tensor:
        """Pruned ``weights`` ``[candidates, rows, cols]`` (fp32, same column order) given their input
        Hessians ``[candidates, cols, cols]``."""
        weights = weights.detach().float()
        if self.score == "sparsegpt":
            return obs_prune(weights, hessians, self.n, self.m, self.block_size, self.dampening_frac)
        return torch.stack([
            weight * nm_mask(pruning_score(self.score, weight, hessian=hessian), self.n, self.m)
            for weight, hessian in zip(weights, hessians)
        ])


def pruned_output_errors(
    weight: torch.Tensor, hessian: torch.Tensor, orders: list[torch.Tensor], pruner: PrunerModel
) -> list[float]:
    """``tr(dW H dW^T)`` of ``weight`` pruned by ``pruner`` after its input columns take each order."""
    weight, hessian = weight.detach().float(), hessian.float()
    permuted = torch.stack([weight[:, order] for order in orders])
    permuted_hessian = torch.stack([hessian[order][:, order] for order in orders])
    delta = permuted - pruner.prune(permuted, permuted_hessian)
    return [float(e) for e in ((delta @ permuted_hessian) * delta).sum(dim=(-2, -1))]
