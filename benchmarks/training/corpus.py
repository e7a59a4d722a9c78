"""The English Gutenberg corpus: books, a book-level validation split, a byte-level BPE tokenizer, token streams.

Token ids are cached in the work directory (uint16 ``.npy``) so that several model sizes and resumed runs share
one tokenizer and one tokenisation pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loguru import logger

BOOK_SEPARATOR = "<|endoftext|>"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def load_books(corpus_dir: Path) -> list[str]:
    """All books of ``corpus_dir/*.txt`` in file-name order, cut at the separator line, blank books dropped."""
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt files in corpus directory {corpus_dir} (pass --corpus-dir)")
    books = []
    for path in files:
        for book in path.read_text(encoding="utf-8").split(f"\n{BOOK_SEPARATOR}\n"):
            if book.strip():
                books.append(book.strip("\n") + "\n")
    return books


def split_books(books: list[str], num_val_books: int) -> tuple[list[str], list[str]]:
    """Hold out ``num_val_books`` whole books, evenly spaced over the corpus order (no text shared with training)."""
    if not 0 < num_val_books < len(books):
        raise ValueError(f"--val-books must be in [1, {len(books) - 1}] for a corpus of {len(books)} books")
    val_index = {(2 * i + 1) * len(books) // (2 * num_val_books) for i in range(num_val_books)}
    train = [b for i, b in enumerate(books) if i not in val_index]
    val = [b for i, b in enumerate(books) if i in val_index]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (every byte is a base symbol, so no text is ever unknown) with BOS/EOS/PAD specials.

    Returns a transformers fast tokenizer that prepends BOS, like Llama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size <= base:
        raise ValueError(f"--vocab-size must exceed {base} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    if vocab_size > 2**16:
        raise ValueError("--vocab-size must be at most 65536 (token ids are cached as uint16)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """One 1-D stream: ``BOS doc EOS`` for each document, in order."""
    encoded = tokenizer(documents, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for ids in encoded for t in (*ids, eos)], dtype=torch.long)


@dataclass
class PreparedCorpus:
    """Tokenizer, training stream and validation books/stream."""

    tokenizer: object
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    val_books: list[str]
    cache_dir: Path


def _cache_key(corpus_dir: Path, vocab_size: int, num_val_books: int) -> str:
    files = sorted(Path(corpus_dir).glob("*.txt"))
    fingerprint = [(p.name, p.stat().st_size) for p in files] + [vocab_size, num_val_books]
    return hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:12]


def prepare_corpus(corpus_dir: Path, work_dir: Path, vocab_size: int, num_val_books: int) -> PreparedCorpus:
    """Load books, split, train (or reuse the cached) tokenizer and token streams."""
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    books = load_books(corpus_dir)
    train_books, val_books = split_books(books, num_val_books)
    cache_dir = Path(work_dir) / f"corpus-{_cache_key(corpus_dir, vocab_size, num_val_books)}"
    tokenizer_dir = cache_dir / "tokenizer"
    if (cache_dir / "train.npy").exists():
        logger.info(f"reusing tokenizer and token ids from {cache_dir}")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        train_tokens = torch.from_numpy(np.load(cache_dir / "train.npy").astype(np.int64))
        val_tokens = torch.from_numpy(np.load(cache_dir / "val.npy").astype(np.int64))
        return PreparedCorpus(tokenizer, train_tokens, val_tokens, val_books, cache_dir)
    logger.info(f"training a {vocab_size}-token BPE on {len(train_books)} books ({len(val_books)} held out)")
    tokenizer = train_tokenizer(train_books, vocab_size)
    train_tokens, val_tokens = token_stream(tokenizer, train_books), token_stream(tokenizer, val_books)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(tokenizer_dir)
    np.save(cache_dir / "train.npy", train_tokens.numpy().astype(np.uint16))
    np.save(cache_dir / "val.npy", val_tokens.numpy().astype(np.uint16))
    chars = sum(map(len, train_books))
    logger.info(f"train: {len(train_tokens):,} tokens ({chars / len(train_tokens):.2f} chars/token); "
                f"val: {len(val_tokens):,} tokens")
    return PreparedCorpus(tokenizer, train_tokens, val_tokens, val_books, cache_dir)
