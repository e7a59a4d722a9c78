"""Helpers for `benchmarks/train_models.py`: corpus and tokenizer, model presets, training loop, evaluation.

Kept outside the `learned_permutation` package: these models are test subjects for the benchmarks, not part
of the permutation method.
"""
