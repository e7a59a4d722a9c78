"""How the pruner that follows the modifier prunes one Linear: the score its N:M mask follows.

Solvers, the whole-model choice (``plugin/selection.py``) and the end-to-end learner all mask a
Linear the way the pruner will: Wanda's ``|W| * ||x||``, or SparseGPT's OBS saliency
``w^2 / [H^-1]_jj`` (``learned_permutation.math.scores``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PrunerModel"]


@dataclass(frozen=True)
class PrunerModel:
    """The following pruner's ``score`` kind and N:M pattern."""

    score: str
    n: int
    m: int

    @property
    def needs_hessian(self) -> bool:
        """SparseGPT's saliency reads the inverse Hessian; every other score only the input energy."""
        return self.score == "sparsegpt"
