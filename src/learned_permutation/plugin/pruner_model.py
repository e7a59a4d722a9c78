"""How the pruner that follows the modifier prunes one Linear: the score its N:M mask follows.

Solvers, the whole-model choice (``plugin/selection.py``) and the end-to-end learner all mask a
Linear the way the pruner will: Wanda's ``|W| * ||x||``, or SparseGPT's OBS saliency
``w^2 / [H^-1]_jj`` (``learned_permutation.math.scores``); the whole-model choice can also run
SparseGPT's own weight update (``simulate_sparsegpt_update``).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcompressor.modifiers.pruning import SparseGPTModifier

__all__ = ["PrunerModel"]


@dataclass(frozen=True)
class PrunerModel:
    """The following pruner's ``score`` kind and N:M pattern; ``obs_block_size`` and ``obs_dampening``
    are the following SparseGPT's ``block_size`` and ``dampening_frac`` (``obs_block_size`` None: no
    SparseGPT follows, pruning is the score's mask alone)."""

    score: str
    n: int
    m: int
    obs_block_size: int | None = None
    obs_dampening: float = 0.01

    @classmethod
    def following(cls, pruner, score: str, n: int, m: int) -> PrunerModel:
        """The model of ``pruner`` (the modifier after ours, or None) pruning by ``score``."""
        if isinstance(pruner, SparseGPTModifier):
            return cls(score, n, m, int(pruner.block_size), float(pruner.dampening_frac))
        return cls(score, n, m)

    @property
    def needs_hessian(self) -> bool:
        """SparseGPT's saliency reads the inverse Hessian; every other score only the input energy."""
        return self.score == "sparsegpt"
