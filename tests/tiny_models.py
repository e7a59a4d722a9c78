"""Tiny random models built from the real transformers config classes of every supported
architecture, sized so every site is foldable for 2:4 and 4:8 (head_dim 16, GQA, biases,
q/k norms, tied and untied embeddings), with random norm weights so norm folding is tested.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from learned_permutation.tools.llama2c import EMBEDDED_MODEL_DIR

TINY_SHAPE = dict(
    vocab_size=512,  # the embedded stories260K tokenizer's vocabulary, reused for these models
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY_SHAPE, tie_word_embeddings=False),
    "llama_tied_mha": lambda: LlamaConfig(**{**TINY_SHAPE, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**TINY_SHAPE, tie_word_embeddings=False, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY_SHAPE, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**TINY_SHAPE, head_dim=16, tie_word_embeddings=False),
}


def random_model(config, seed: int = 0, bias_std: float = 0.1) -> torch.nn.Module:
    """A random fp32 model for a transformers config, with random norm weights and biases so that
    folding them is exercised (default init makes norms all ones and biases zero)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, bias_std)
    return model.eval()


def build_tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    return random_model(TINY_CONFIGS[kind](), seed)


def save_tiny_model(kind: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny model with the embedded tokenizer, as ``oneshot`` needs a model on disk."""
    build_tiny_model(kind, seed).save_pretrained(directory)
    for path in EMBEDDED_MODEL_DIR.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, directory / path.name)
    return directory
