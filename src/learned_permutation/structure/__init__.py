"""Model structure: architecture registry, permutation sites and exact folding."""

from learned_permutation.structure.folding import fold_permutation, fold_permutations, validate_permutation
from learned_permutation.structure.registry import (
    SUPPORTED_ARCHITECTURES,
    ArchitectureMapping,
    AttentionShape,
    UnsupportedArchitectureError,
    mapping_for,
    mapping_for_config,
)
from learned_permutation.structure.sites import (
    SITE_KINDS,
    NamedModule,
    PermutationSite,
    SiteNotFoldableError,
    check_foldable_config,
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
    "check_foldable_config",
    "find_sites",
    "fold_permutation",
    "fold_permutations",
    "mapping_for",
    "mapping_for_config",
    "validate_permutation",
]
