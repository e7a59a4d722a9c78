"""Pure math: N:M masks, pruning scores, objectives and permutation solvers (torch + scipy only)."""

from .masks import nm_mask, parse_mask_structure
from .objectives import Consumer, SiteProblem, reconstruction_error, retained_score
from .scores import SCORE_KINDS, score
from .solvers import SOLVERS, solve_permutation, solve_site

__all__ = [
    "SCORE_KINDS",
    "SOLVERS",
    "solve_site",
    "Consumer",
    "SiteProblem",
    "nm_mask",
    "parse_mask_structure",
    "reconstruction_error",
    "retained_score",
    "score",
    "solve_permutation",
]
