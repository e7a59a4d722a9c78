"""Tiny random models for the structure tests, built from the real transformers config classes.

Variants cover every supported architecture and every folding path: GQA with 1, 2 and 4 query
heads per KV head, tied and untied embeddings, Qwen2's q/k/v biases, Llama's optional attention
and MLP biases, Qwen3's q_norm/k_norm with a head_dim unrelated to hidden_size. Norm weights and
biases are random so their permutation is actually exercised.
"""

from __future__ import annotations

import torch
from tiny_models import random_model
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from learned_permutation.structure import PermutationSite

_SHAPE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,  # large enough that logits are not all near zero
)

STRUCTURE_VARIANTS = {
    "llama_gqa_tied": lambda: LlamaConfig(**_SHAPE, tie_word_embeddings=True),
    "llama_mha_untied_biases": lambda: LlamaConfig(
        **{**_SHAPE, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True, tie_word_embeddings=False
    ),
    "mistral_one_kv_head": lambda: MistralConfig(
        **{**_SHAPE, "num_key_value_heads": 1}, head_dim=8, sliding_window=None, tie_word_embeddings=False
    ),
    "qwen2_biases_tied": lambda: Qwen2Config(**_SHAPE, tie_word_embeddings=True),
    "qwen3_qk_norm": lambda: Qwen3Config(**_SHAPE, head_dim=16, tie_word_embeddings=False),
}


def build_model(config) -> torch.nn.Module:
    """A random fp32 model for `config` (a config object or a STRUCTURE_VARIANTS key)."""
    if isinstance(config, str):
        config = STRUCTURE_VARIANTS[config]()
    return random_model(config, bias_std=0.2)


def random_site_permutation(site: PermutationSite, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of the site's channels that respects its block size."""
    block = site.block_size or site.size
    within_block = torch.argsort(torch.rand(site.size // block, block, generator=generator), dim=1)
    return (within_block + torch.arange(0, site.size, block)[:, None]).flatten()


def sample_tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, 12), generator=generator)


@torch.no_grad()
def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def assert_same_logits(expected: torch.Tensor, actual: torch.Tensor) -> None:
    """fp32 equality up to 1e-4 of the logit scale (rounding only)."""
    scale = float(expected.abs().max())
    difference = float((expected - actual).abs().max())
    assert difference <= 1e-4 * max(scale, 1.0), f"max |logit difference| {difference:.3g} at logit scale {scale:.3g}"
