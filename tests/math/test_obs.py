"""The batched OBS pruner is SparseGPT's own procedure: it matches llm-compressor's ``sparsify_weight``."""

from __future__ import annotations

import pytest
import torch

from learned_permutation.math.obs import obs_prune
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight


def problem(seed: int, rows: int = 12, columns: int = 48):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    inputs = torch.randn(200, columns, generator=generator) * torch.linspace(0.1, 2.0, columns)
    inputs[:, 5] = 0.0  # a dead input channel
    return weight, inputs.T @ inputs


def llm_compressor_result(weight, hessian, n, m, block_size):
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    module.weight.data = weight.clone()
    _, pruned = sparsify_weight(module, {module: hessian.clone()}, n / m, n, m, block_size, 0.01, False)
    return pruned


@pytest.mark.parametrize(("n", "m", "block_size"), [(2, 4, 16), (4, 8, 32), (2, 4, 128)])
def test_batched_obs_matches_llm_compressor_for_each_candidate(n, m, block_size):
    pairs = [problem(seed) for seed in range(3)]
    batched = obs_prune(torch.stack([w for w, _ in pairs]), torch.stack([h for _, h in pairs]), n, m, block_size)
    for (weight, hessian), ours in zip(pairs, batched):
        expected = llm_compressor_result(weight, hessian, n, m, block_size)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(ours == 0, expected == 0)
