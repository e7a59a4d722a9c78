"""Shared fixtures: a tiny random Llama saved to disk (llm-compressor's oneshot needs a saved model and
a tokenizer) and its tokenizer; offline mode for the hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from shared_helpers import TINY_LLAMA, byte_level_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP threads
# made a 128x64 @ 64x172 matmul 400x slower (15 ms instead of 38 us) while other processes held the cores.
torch.set_num_threads(1)

@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random-weight LlamaForCausalLM (2 layers, hidden 64, GQA 4/2 heads, context 128) and its
    tokenizer saved in fp32. Treat as read-only: it is shared by the whole session."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_LLAMA,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """(model, tokenizer) loaded from `tiny_llama_dir`; do not modify the model in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)
