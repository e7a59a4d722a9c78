"""The llama2.c converter and the embedded stories260K checkpoint.

The converted model is checked against an independent forward pass written here from the llama2.c layout
(adjacent-pair RoPE using the file's own cos/sin tables, no transformers), and the tokenizer against
sentencepiece itself.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from learned_permutation.tools.llama2c import (
    EMBEDDED_MODEL_DIR,
    Llama2cFormatError,
    convert_llama2c,
    read_llama2c_checkpoint,
)

from shared_helpers import shared_file

SOURCE_CHECKPOINT = "stories260k/stories260K.bin"  # under the shared data directory; tests skip without it
SOURCE_TOKENIZER = "stories260k/tok512.model"
EMBEDDED_TOKENIZER_MODEL = EMBEDDED_MODEL_DIR / "tok512.model"

PROMPT = "Once upon a time"
PROMPT_IDS = [1, 403, 407, 261, 378]  # BOS + sentencepiece ids of the prompt
GREEDY_NEW_TOKENS = 48
# Greedy continuation of PROMPT_IDS by the independent reference forward pass below (the snapshot printed by
# test_greedy_continuation_matches_reference); it starts with the sample Karpathy documents for stories260K.
GREEDY_SNAPSHOT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
    "she saw a big, red ball. She wanted to play with it,"
)

TOKENIZER_PROBES = [
    "Once upon a time",
    "Hello, world! How's it going?? (fine) -- \"quoted\"; [x] {y} <z> a/b\\c @#$%^&*_+=|~`",
    "Pi is 3.14159, 1,000,000 and 2024-11-23; call 555-0199.",
    "  leading and trailing spaces  ",
    "many     internal    spaces",
    "\nnewline first\n\nblank line\r\nCRLF\tand\ttabs\n",
    " \n space then newline",
    "café naïve résumé ñandú — “smart quotes” … ‘single’",
    "日本語のテキスト, Ελληνικά, русский, עברית, العربية",
    "emoji 😀🎉👍🏽 and symbols ™ € £ ¥ © ®",
    "non-breaking\u00a0space, hair\u200aspace, ideographic\u3000space, zero\u200bwidth",
    "<s> literal control pieces </s> <unk>",
    "",
    "   ",
    "a",
    "The end.",
]


# --- independent llama2.c reference (reads the raw file, adjacent-pair RoPE, float64) -------------------------


def _reference_weights(path: Path) -> dict:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = np.fromfile(path, dtype="<i4", count=7).tolist()
    floats = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=28).astype(np.float64))
    head = dim // heads
    sizes = {
        "emb": (abs(vocab), dim), "rms_att": (layers, dim), "wq": (layers, dim, dim),
        "wk": (layers, kv_heads * head, dim), "wv": (layers, kv_heads * head, dim), "wo": (layers, dim, dim),
        "rms_ffn": (layers, dim), "w1": (layers, hidden, dim), "w2": (layers, dim, hidden),
        "w3": (layers, hidden, dim), "rms_final": (dim,), "cos": (seq_len, head // 2), "sin": (seq_len, head // 2),
    }  # fmt: skip
    if vocab < 0:
        sizes["classifier"] = (-vocab, dim)
    weights, start = {"heads": heads, "kv_heads": kv_heads}, 0
    for name, shape in sizes.items():
        count = int(np.prod(shape))
        weights[name] = floats[start : start + count].reshape(shape)
        start += count
    assert start == floats.numel()
    weights.setdefault("classifier", weights["emb"])
    return weights


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


def _rotate_adjacent_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotates (2i, 2i+1) by the file's angle for position t and pair i."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def reference_logits(weights: dict, tokens: list[int]) -> torch.Tensor:
    steps, heads, kv_heads = len(tokens), weights["heads"], weights["kv_heads"]
    cos, sin = weights["cos"][:steps], weights["sin"][:steps]
    causal = torch.ones(steps, steps, dtype=torch.bool).tril()
    x = weights["emb"][torch.tensor(tokens)]
    for layer in range(weights["wq"].shape[0]):
        h = _rmsnorm(x, weights["rms_att"][layer])
        q = _rotate_adjacent_pairs((h @ weights["wq"][layer].T).unflatten(-1, (heads, -1)), cos, sin)
        k = _rotate_adjacent_pairs((h @ weights["wk"][layer].T).unflatten(-1, (kv_heads, -1)), cos, sin)
        v = (h @ weights["wv"][layer].T).unflatten(-1, (kv_heads, -1))
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))  # query head i reads kv head i // g
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", attention, v).flatten(1) @ weights["wo"][layer].T
        h = _rmsnorm(x, weights["rms_ffn"][layer])
        gated = torch.nn.functional.silu(h @ weights["w1"][layer].T) * (h @ weights["w3"][layer].T)
        x = x + gated @ weights["w2"][layer].T
    return _rmsnorm(x, weights["rms_final"]) @ weights["classifier"].T


def reference_greedy(weights: dict, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(reference_logits(weights, tokens)[-1].argmax()))
    return tokens


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_conversion(tmp_path_factory) -> Path:
    return convert_llama2c(
        shared_file(SOURCE_CHECKPOINT), shared_file(SOURCE_TOKENIZER), tmp_path_factory.mktemp("stories260k")
    )


@pytest.fixture(scope="module")
def embedded_model():
    return AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def embedded_tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)


@pytest.fixture(scope="module")
def sentencepiece_processor():
    return sentencepiece.SentencePieceProcessor(model_file=str(EMBEDDED_TOKENIZER_MODEL))


def _hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def _probe_sequences(vocab_size: int, seq_len: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [
        PROMPT_IDS,
        [1] + torch.randint(3, vocab_size, (40,), generator=generator).tolist(),
        [1] + torch.randint(0, vocab_size, (seq_len - 1,), generator=generator).tolist(),  # the full context
    ]


# --- model equivalence ------------------------------------------------------------------------------------------


def test_converted_logits_match_reference(fresh_conversion):
    """float32 model vs float64 reference; measured max |diff| ~2e-5 on logits of magnitude ~19."""
    weights = _reference_weights(shared_file(SOURCE_CHECKPOINT))
    model = AutoModelForCausalLM.from_pretrained(fresh_conversion, dtype=torch.float32).eval()
    for tokens in _probe_sequences(model.config.vocab_size, model.config.max_position_embeddings):
        difference = (_hf_logits(model, tokens).double() - reference_logits(weights, tokens)).abs().max().item()
        assert difference < 1e-4, f"max |logit diff| {difference:.2e} on {len(tokens)} tokens"


def test_greedy_continuation_matches_reference(fresh_conversion, sentencepiece_processor):
    reference = reference_greedy(_reference_weights(shared_file(SOURCE_CHECKPOINT)), PROMPT_IDS, GREEDY_NEW_TOKENS)
    text = sentencepiece_processor.decode(reference)
    print(f"reference greedy continuation: {text!r}")
    assert text == GREEDY_SNAPSHOT

    model = AutoModelForCausalLM.from_pretrained(fresh_conversion).eval()
    generated = model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False)
    assert generated[0].tolist() == reference


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_checkpoint_round_trip(tmp_path, tied):
    """A random small model (never skips): covers the untied classifier (negative vocab_size) as well."""
    path = _write_synthetic_checkpoint(tmp_path / "tiny.bin", tied=tied)
    output = convert_llama2c(path, EMBEDDED_TOKENIZER_MODEL, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float64).eval()
    assert model.config.tie_word_embeddings is tied
    weights = _reference_weights(path)
    for tokens in _probe_sequences(model.config.vocab_size, model.config.max_position_embeddings):
        difference = (_hf_logits(model, tokens) - reference_logits(weights, tokens)).abs().max().item()
        assert difference < 1e-5


def _write_synthetic_checkpoint(path: Path, tied: bool, dim=16, hidden=24, layers=2, heads=4, kv_heads=2,
                                vocab=512, seq_len=64) -> Path:  # fmt: skip
    head = dim // heads
    generator = torch.Generator().manual_seed(1)
    parameter_count = (
        vocab * dim + 2 * layers * dim + layers * (2 * dim * dim + 2 * kv_heads * head * dim + 3 * hidden * dim)
        + dim + (0 if tied else vocab * dim)
    )  # fmt: skip
    parameters = torch.randn(parameter_count, generator=generator) * 0.3
    angles = torch.arange(seq_len)[:, None] * 10000.0 ** (-torch.arange(0, head, 2) / head)
    before_rope = parameters[: parameter_count - (0 if tied else vocab * dim)]
    classifier = parameters[before_rope.numel() :]
    payload = torch.cat([before_rope, angles.cos().flatten(), angles.sin().flatten(), classifier])
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if tied else -vocab, seq_len)
    path.write_bytes(header + payload.to(torch.float32).numpy().tobytes())
    return path


# --- tokenizer --------------------------------------------------------------------------------------------------


def test_tokenizer_matches_sentencepiece_on_probes(embedded_tokenizer, sentencepiece_processor):
    for text in TOKENIZER_PROBES:
        expected = sentencepiece_processor.encode(text)
        assert embedded_tokenizer(text, add_special_tokens=False).input_ids == expected, repr(text)
        assert embedded_tokenizer.decode(expected) == sentencepiece_processor.decode(expected), repr(text)
    round_trip = "Hello, world! 3.14 café 日本 😀\nnext\tline"
    assert embedded_tokenizer.decode(embedded_tokenizer(round_trip).input_ids, skip_special_tokens=True) == round_trip


def test_tokenizer_matches_sentencepiece_on_wikitext(embedded_tokenizer, sentencepiece_processor):
    lines = shared_file("wikitext2/wiki.valid.raw").read_text(encoding="utf-8").split("\n")
    expected = sentencepiece_processor.encode(lines)
    assert embedded_tokenizer(lines, add_special_tokens=False).input_ids == expected


def test_tokenizer_special_tokens_and_padding(embedded_tokenizer):
    tokenizer = embedded_tokenizer
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == tokenizer.unk_token_id
    assert tokenizer.model_max_length == 512 and tokenizer.padding_side == "right"
    assert tokenizer(PROMPT).input_ids == PROMPT_IDS
    batch = tokenizer([PROMPT, "Once"], padding=True)
    assert batch.input_ids[1] == [1, 403, 0, 0, 0] and batch.attention_mask[1] == [1, 1, 0, 0, 0]


def test_embedded_tokenizer_is_the_shared_source():
    digest = hashlib.sha256(EMBEDDED_TOKENIZER_MODEL.read_bytes()).hexdigest()
    assert digest == "822b28dcdee7b4f2de3332e0066a3f33688e08afb26e9e7808a58aa6426bd55b"
    assert digest in (EMBEDDED_MODEL_DIR / "LICENSE-NOTE.md").read_text()


# --- embedded checkpoint ----------------------------------------------------------------------------------------


def test_embedded_model_generates_the_snapshot(embedded_model, embedded_tokenizer):
    prompt = embedded_tokenizer(PROMPT, return_tensors="pt").input_ids
    generated = embedded_model.generate(prompt, max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False)
    assert embedded_tokenizer.decode(generated[0], skip_special_tokens=True) == GREEDY_SNAPSHOT
    assert embedded_model.config.tie_word_embeddings
    assert embedded_model.lm_head.weight.data_ptr() == embedded_model.model.embed_tokens.weight.data_ptr()
    assert embedded_model.generation_config.pad_token_id == embedded_tokenizer.pad_token_id


def test_embedded_checkpoint_equals_fresh_conversion(fresh_conversion):
    embedded = load_file(EMBEDDED_MODEL_DIR / "model.safetensors")
    fresh = load_file(fresh_conversion / "model.safetensors")
    assert embedded.keys() == fresh.keys()
    for name, tensor in fresh.items():
        assert torch.equal(embedded[name], tensor), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert _json_without_version(EMBEDDED_MODEL_DIR / name) == _json_without_version(fresh_conversion / name)


def _json_without_version(path: Path) -> dict:
    """Drop the writer's transformers version, which changes within llm-compressor's pin without changing content."""
    content = json.loads(path.read_text())
    content.pop("transformers_version", None)
    return content


# --- format errors ----------------------------------------------------------------------------------------------


def test_reader_splits_the_real_checkpoint():
    header, tensors = read_llama2c_checkpoint(shared_file(SOURCE_CHECKPOINT))
    assert (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads) == (64, 172, 5, 8, 4)
    assert header.shared_classifier and "classifier" not in tensors
    assert sum(t.numel() for name, t in tensors.items() if not name.startswith("rope")) == 260_032


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw[:-4], "truncated"),
        (lambda raw: raw[: len(raw) // 2], "truncated"),
        (lambda raw: raw + b"\0" * 8, "trailing data"),
        (lambda raw: raw[:20], "shorter than the 28-byte"),
        (lambda raw: struct.pack("<I", 0x616B3432) + raw[4:], "legacy v0"),
        (lambda raw: struct.pack("<i", 15) + raw[4:], "inconsistent header"),
        (lambda raw: raw[:8] + struct.pack("<i", 0) + raw[12:], "zero or negative"),
        (lambda raw: raw[:4] + struct.pack("<i", -24) + raw[8:], "zero or negative"),
    ],
)
def test_malformed_checkpoints_raise_clear_errors(tmp_path, edit, message):
    source = _write_synthetic_checkpoint(tmp_path / "good.bin", tied=True)
    broken = tmp_path / "broken.bin"
    broken.write_bytes(edit(source.read_bytes()))
    with pytest.raises(Llama2cFormatError, match=message):
        convert_llama2c(broken, EMBEDDED_TOKENIZER_MODEL, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_files_and_vocab_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="llama2.c checkpoint not found"):
        convert_llama2c(tmp_path / "missing.bin", EMBEDDED_TOKENIZER_MODEL, tmp_path / "out")
    checkpoint = _write_synthetic_checkpoint(tmp_path / "small_vocab.bin", tied=True, vocab=300)
    with pytest.raises(ValueError, match="512 pieces but .* vocab_size 300"):
        convert_llama2c(checkpoint, EMBEDDED_TOKENIZER_MODEL, tmp_path / "out")
    not_a_model = tmp_path / "tok.model"
    not_a_model.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        convert_llama2c(_write_synthetic_checkpoint(tmp_path / "ok.bin", tied=True), not_a_model, tmp_path / "out")
