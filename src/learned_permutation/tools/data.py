"""Offline calibration data: `datasets.Dataset`s with a ``text`` column for ``oneshot``.

Three sources, none of which touches a hub:

* a local text file, cut into paragraphs at blank lines and packed into chunks (`text_file_dataset`);
* a parquet file with a text column, e.g. a C4 sample (`parquet_dataset`);
* text sampled from the model itself (`sample_text_dataset`), the default when no corpus matches the
  model's domain (stories260K only knows children's stories; C4 would calibrate it on noise).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from datasets import Dataset

_BLANK_LINES = re.compile(r"\n[ \t]*\n")

SHARED_DATA_ENV = "LEARNED_PERMUTATION_SHARED_DATA"


def shared_data_dir() -> Path:
    """The offline data folder (WikiText-2, corpora): ``$LEARNED_PERMUTATION_SHARED_DATA``, else
    ``../shared/data`` beside the repository checkout this module lives in (an installed wheel has no
    such folder: set the variable)."""
    override = os.environ.get(SHARED_DATA_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[4] / "shared" / "data"


class InputError(ValueError):
    """A user-supplied input (file, recipe, option) is unusable; the message says why and what to do."""


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path} (give the path of an existing file)")
    return path


def _nonempty(texts: list[str], source: str) -> Dataset:
    if not texts:
        raise InputError(f"calibration set is empty: {source} holds no non-blank text")
    return Dataset.from_dict({"text": texts})


def split_paragraphs(text: str, min_chars: int) -> list[str]:
    """Cut ``text`` at blank lines and pack consecutive paragraphs into chunks.

    Paragraphs are joined with a blank line until a chunk holds at least ``min_chars`` characters,
    so headings and one-line paragraphs do not become calibration samples of a few tokens; the last
    chunk may be shorter. Whitespace-only paragraphs are dropped. ``min_chars=0`` gives one row per
    paragraph.
    """
    chunks, current = [], []
    for paragraph in _BLANK_LINES.split(text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        current.append(paragraph)
        if sum(len(p) for p in current) + 2 * (len(current) - 1) >= min_chars:
            chunks.append("\n\n".join(current))
            current = []
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def text_file_dataset(path: str | Path, min_chars: int = 2000) -> Dataset:
    """Calibration rows from a UTF-8 text file: blank-line paragraphs packed to ``min_chars`` (see
    `split_paragraphs`). About 2000 characters is roughly 500 tokens of English, enough to fill the
    usual calibration sequence length after truncation."""
    path = _require_file(path, "text file")
    return _nonempty(split_paragraphs(path.read_text(encoding="utf-8"), min_chars), str(path))


def parquet_dataset(path: str | Path, text_column: str = "text") -> Dataset:
    """Calibration rows from one string column of a parquet file, renamed to ``text``; blank rows dropped."""
    import pyarrow.parquet as pq

    path = _require_file(path, "parquet file")
    columns = pq.read_schema(path).names
    if text_column not in columns:
        raise InputError(
            f"parquet file {path} has no column {text_column!r}; its columns are {columns} "
            "(pick one with the text column option)"
        )
    values = pq.read_table(path, columns=[text_column]).column(text_column).to_pylist()
    texts = [v for v in values if isinstance(v, str) and v.strip()]
    return _nonempty(texts, f"{path} column {text_column!r}")


def file_dataset(path: str | Path, text_column: str = "text", min_chars: int = 2000) -> Dataset:
    """`parquet_dataset` for ``*.parquet`` files, `text_file_dataset` for anything else."""
    if Path(path).suffix.lower() == ".parquet":
        return parquet_dataset(path, text_column)
    return text_file_dataset(path, min_chars)


@torch.no_grad()
def sample_token_ids(
    model,
    bos_token_id: int,
    num_samples: int,
    seq_len: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> torch.Tensor:
    """Ancestral samples from the model: ``[num_samples, seq_len]`` token ids after a BOS prompt.

    Draws from a ``torch.Generator`` seeded with ``seed`` on the model's device, so the result depends
    only on the model, the seed, the batch size and the device. Uses the KV cache, one step per token.
    """
    if num_samples <= 0 or seq_len <= 0:
        raise InputError(f"need num_samples > 0 and seq_len > 0, got {num_samples} and {seq_len}")
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    batches = []
    for start in range(0, num_samples, batch_size):
        rows = min(batch_size, num_samples - start)
        tokens = torch.full((rows, 1), bos_token_id, dtype=torch.long, device=device)
        past, sampled = None, []
        for _ in range(seq_len):
            out = model(input_ids=tokens, past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1, :].float() / temperature, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator)
            sampled.append(tokens)
        batches.append(torch.cat(sampled, dim=1))
    model.train(was_training)
    return torch.cat(batches).cpu()


def sample_text_dataset(
    model,
    tokenizer,
    num_samples: int,
    seq_len: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> Dataset:
    """Calibration rows of text sampled from ``model`` (see `sample_token_ids`), decoded without special
    tokens. Re-tokenising the text gives about ``seq_len`` tokens, not exactly: a sample may cross
    story boundaries (BOS/EOS tokens are dropped) and decoding does not round-trip every token sequence.
    """
    if tokenizer.bos_token_id is None:
        raise InputError("sampling from the model needs a tokenizer with a BOS token to start from")
    ids = sample_token_ids(model, tokenizer.bos_token_id, num_samples, seq_len, seed, temperature, batch_size)
    texts = [t for t in tokenizer.batch_decode(ids, skip_special_tokens=True) if t.strip()]
    return _nonempty(texts, f"{num_samples} samples from the model")
