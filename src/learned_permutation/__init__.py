"""Learned channel permutations for N:M sparsity, as an llm-compressor plugin."""
