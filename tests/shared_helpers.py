"""Helpers shared by test modules: the offline shared-data directory, a byte-level tokenizer that needs no
download, and the tiny Llama shape. Kept out of conftest.py because several conftest modules exist and
`from conftest import ...` resolves to whichever was imported first."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import TINY_SHAPE

from learned_permutation.tools.data import shared_data_dir

TINY_LLAMA = {key: TINY_SHAPE[key] for key in (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings",
)}


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
