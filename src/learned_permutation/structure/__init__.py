"""Model structure: architecture registry, permutation sites and exact folding."""

from learned_permutation.structure.folding import fold_permutation, validate_permutation
from learned_permutation.structure.registry import (
    SUPPORTED_ARCHITECTURES,
    ArchitectureMapping,
    AttentionShape,
    UnsupportedArchitectureError,
    mapping_for,
)
from learned_permutation.structure.sites import (
    SITE_KINDS,
    NamedModule,
    PermutationSite,
    SiteNotFoldableError,
    find_sites,
)

__all__ = [
    "SITE_KINDS",
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureMapping",
    "AttentionShape",
    "NamedModule",
    "PermutationSite",
    "SiteNotFoldableError",
    "UnsupportedArchitectureError",
    "find_sites",
    "fold_permutation",
    "mapping_for",
    "validate_permutation",
]
