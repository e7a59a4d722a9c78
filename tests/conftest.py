"""Shared fixtures: a tiny random Llama saved to disk (llm-compressor's oneshot needs a saved model and
a tokenizer), its tokenizer, and the offline shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP threads
# made a 128x64 @ 64x172 matmul 400x slower (15 ms instead of 38 us) while other processes held the cores.
torch.set_num_threads(1)

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def shared_data_dir() -> Path:
    """`../shared/data` beside the repository root, or ``$LEARNED_PERMUTATION_SHARED_DATA``."""
    override = os.environ.get("LEARNED_PERMUTATION_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file under the shared data directory; skips the test when it is absent."""
    path = shared_data_dir() / relative
    if not path.is_file():
        pytest.skip(f"shared data file {path} is not available")
    return path


def byte_level_tokenizer():
    """A fast byte-level tokenizer (256 byte tokens, no merges) with Llama's special tokens and a BOS
    prepended on encode: every string round-trips, and nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


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
