"""What the pruner that follows really leaves of a Linear, for a candidate column order.

A per-layer site (``mlp``, ``attn_vo``) changes only the input-column order of its consumer
(``down_proj``, ``o_proj``). Its candidates are judged by the output error the pruner itself would
leave on that Linear, ``tr((W - W_pruned) H (W - W_pruned)^T)`` with ``H = X^T X`` of the layer's
calibration inputs: with Wanda the pruned weight is Wanda's N:M mask in the candidate's order; with
SparseGPT it is SparseGPT's OBS result (``learned_permutation.math.obs``, the procedure of
llm-compressor's ``sparsify_weight`` with the pruner's block size and dampening, batched over the
candidates) on the permuted weight and Hessian, so the re-fit of the kept weights, which a mask-only
score cannot see, decides too.

Both pruners treat each weight row on its own given ``H`` (Wanda's mask is per row; SparseGPT's OBS
update of a row reads only that row and ``H^-1``), so the error is a sum over rows, and candidates are
compared on the same seeded sample of ``ERROR_ROWS`` rows: an unbiased estimate of the whole error up to
a common factor, at a fraction of the cost (a 2048 x 8192 ``down_proj``: 8x less). Wanda's error is taken
in the stored column order, so the Hessian is never copied per candidate; SparseGPT's damped inverse
Hessian is computed once and permuted per candidate (only its Cholesky factor depends on the order);
candidates share one OBS pass only while their inverses stay small (``OBS_BATCH_BYTES``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learned_permutation.math.objectives import mask_in_original_order
from learned_permutation.math.obs import damped_inverse, obs_prune_with_inverse
from learned_permutation.math import score as pruning_score

__all__ = ["ERROR_ROWS", "PrunerModel", "pruned_output_errors"]

ERROR_ROWS = 256
# SparseGPT candidates share one OBS pass (its per-column loop is paid once) while their permuted inverse
# Hessians fit in this many bytes; a wide Linear (8192 inputs: 256 MiB each) takes them one at a time, so
# the extra memory stays about that of the pruner's own inverse Hessian.
OBS_BATCH_BYTES = 64 * 2**20


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

    def pruned_away(self, weight: torch.Tensor, hessian: torch.Tensor, orders: list[torch.Tensor]) -> torch.Tensor:
        """What pruning removes from ``weight`` (fp32 ``[rows, cols]``) after its input columns take each
        order, ``[candidates, rows, cols]``, back in the stored column order."""
        if self.score == "sparsegpt":
            inverse, dead = damped_inverse(hessian, self.dampening_frac)  # once: it commutes with the orders
            per_batch = max(1, OBS_BATCH_BYTES // (4 * inverse.numel()))
            removed = []
            for start in range(0, len(orders), per_batch):
                batch = orders[start : start + per_batch]
                permuted = torch.stack([weight[:, order] for order in batch])
                inverses = torch.stack([inverse[order][:, order] for order in batch])
                deaths = torch.stack([dead[order] for order in batch])
                deltas = permuted - obs_prune_with_inverse(permuted, inverses, deaths, self.n, self.m, self.block_size)
                removed += [delta[:, torch.argsort(order)] for delta, order in zip(deltas, batch)]
        else:
            scores = pruning_score(self.score, weight, hessian=hessian)
            removed = [weight * ~mask_in_original_order(scores, order, self.n, self.m) for order in orders]
        return torch.stack(removed)


def pruned_output_errors(
    weight: torch.Tensor, hessian: torch.Tensor, orders: list[torch.Tensor], pruner: PrunerModel,
    rows: int | None = ERROR_ROWS,
) -> list[float]:
    """``tr(dW H dW^T)`` of ``weight`` pruned by ``pruner`` after its input columns take each order, over
    a seeded sample of ``rows`` weight rows (every row when None or fewer), the same for all orders."""
    weight, hessian = weight.detach().float(), hessian.float()
    if rows is not None and weight.shape[0] > rows:
        chosen = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))[:rows]
        weight = weight[chosen.sort().values.to(weight.device)]
    orders = [order.to(weight.device) for order in orders]
    return [float(((delta @ hessian) * delta).sum()) for delta in pruner.pruned_away(weight, hessian, orders)]
