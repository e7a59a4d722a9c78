"""Learned channel permutations for N:M sparsity, as an llm-compressor plugin.

Importing the package registers ``LearnedPermutationModifier`` with llm-compressor's
``ModifierFactory``, so YAML recipes passed to ``oneshot()`` find it by name.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from learned_permutation.plugin.artifacts import PERMUTATIONS_FILE, REPORT_FILE, fold_saved_permutations
from learned_permutation.plugin.modifier import LearnedPermutationModifier

__all__ = ["LearnedPermutationModifier", "PERMUTATIONS_FILE", "REPORT_FILE", "fold_saved_permutations"]

ModifierFactory.register("LearnedPermutationModifier", LearnedPermutationModifier)
