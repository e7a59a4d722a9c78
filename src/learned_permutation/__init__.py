"""Learned channel permutations for N:M sparsity, as an llm-compressor plugin.

Importing the package registers ``LearnedPermutationModifier`` with llm-compressor's
``ModifierFactory``, so YAML recipes passed to ``oneshot()`` find it by name.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from learned_permutation.integration.modifier import REPORT_FILE, LearnedPermutationModifier

__all__ = ["LearnedPermutationModifier", "REPORT_FILE"]

ModifierFactory.register("LearnedPermutationModifier", LearnedPermutationModifier)
