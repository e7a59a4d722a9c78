"""What the pruner that follows really leaves of a Linear, for a candidate column order.

A per-layer site (``mlp``, ``attn_vo``) changes only the input-column order of its consumer
(``down_proj``, ``o_proj``). Its candidates are judged by the output error the pruner itself would
leave on that Linear, ``tr((W - W_pruned) H (W - W_pruned)^T)`` with ``H = X^T X`` of the layer's
calibration inputs: with Wanda the pruned weight is Wanda's N:M mask in the candidate's order; with
SparseGPT it is SparseGPT's own OBS result (llm-compressor's ``sparsify_weight``, with the pruner's
block size and dampening) on the permuted weight and Hessian, so the re-fit of the kept weights,
which a mask-only score cannot see, decides too. Cost per candidate: one pruner call on one Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

from learned_permutation.math import nm_mask
from learned_permutation.math import score as pruning_score

__all__ = ["PrunerModel", "pruned_output_error"]


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

    def prune(self, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """The pruned ``weight`` (fp32, same column order) given its input Hessian."""
        weight = weight.detach().float()
        if self.score != "sparsegpt":
            return weight * nm_mask(pruning_score(self.score, weight, hessian=hessian), self.n, self.m)
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
        module.weight.data = weight.clone()
        _, pruned = sparsify_weight(
            module,
            {module: hessian.detach().float().clone()},
            sparsity=self.n / self.m,
            prune_n=self.n,
            prune_m=self.m,
            block_size=self.block_size,
            dampening_frac=self.dampening_frac,
            preserve_sparsity_mask=False,
        )
        return pruned.float()


def pruned_output_error(weight: torch.Tensor, hessian: torch.Tensor, columns: torch.Tensor, pruner: PrunerModel) -> float:
    """``tr(dW H dW^T)`` of ``weight`` pruned by ``pruner`` after its input columns take the order ``columns``."""
    permuted = weight.detach().float()[:, columns]
    permuted_hessian = hessian.float()[columns][:, columns]
    delta = permuted - pruner.prune(permuted, permuted_hessian)
    return float(((delta @ permuted_hessian) * delta).sum())
