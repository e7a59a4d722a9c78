"""Convert llama2.c "legacy v0" checkpoints (Karpathy's tinyllamas, e.g. stories260K) to Hugging Face Llama.

The result is an ordinary `LlamaForCausalLM` directory (safetensors, config, generation config) plus a fast
tokenizer that encodes exactly like the SentencePiece model it was built from, so llm-compressor, lm-eval and
vLLM load it offline with no custom code.

Two things differ between the formats and are handled here:
* llama2.c rotates adjacent pairs (2i, 2i+1) of each head with RoPE; transformers rotates (i, i + head_dim/2).
  Reordering the rows of wq and wk inside every head (even rows first, then odd rows) makes both compute the
  same attention scores.
* transformers 5 rebuilds a `LlamaTokenizer` from `tokenizer.model` with a normaliser that does not match this
  SentencePiece model (it keeps extra whitespace), so the tokenizer is written as a self-contained
  `tokenizer.json` served by the generic `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import argparse
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from learned_permutation.tools.output import refuse_existing_output, staged_output

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "Llama2cFormatError",
    "Llama2cHeader",
    "build_sentencepiece_tokenizer",
    "convert_llama2c",
    "read_llama2c_checkpoint",
]

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "stories260k"
"""stories260K converted by this module, shipped in the wheel: the default model of examples and tests."""

_HEADER = struct.Struct("<7i")
_FLOAT_BYTES = 4
_LLAMA2C_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export format, which this reader does not handle
_RMS_NORM_EPS = 1e-5
_ROPE_THETA = 10000.0
_BOS_ID, _EOS_ID = 1, 2
_SPACE_SYMBOL = "\u2581"  # SentencePiece writes whitespace as U+2581 "lower one eighth block"

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SENTENCEPIECE_BPE = 2


class Llama2cFormatError(ValueError):
    """The file is not a llama2.c legacy-v0 checkpoint this converter can read."""


@dataclass(frozen=True)
class Llama2cHeader:
    """The 7 int32 header fields; a negative vocab_size on disk means an untied classifier follows the RoPE tables."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Name and shape of every float32 block in file order (each per-layer type is stored for all layers)."""
        layers, dim, hidden, kv = self.n_layers, self.dim, self.hidden_dim, self.kv_dim
        shapes = [
            ("token_embedding", (self.vocab_size, dim)),
            ("rms_att", (layers, dim)),
            ("wq", (layers, dim, dim)),
            ("wk", (layers, kv, dim)),
            ("wv", (layers, kv, dim)),
            ("wo", (layers, dim, dim)),
            ("rms_ffn", (layers, dim)),
            ("w1", (layers, hidden, dim)),
            ("w2", (layers, dim, hidden)),
            ("w3", (layers, hidden, dim)),
            ("rms_final", (dim,)),
            ("rope_cos", (self.seq_len, self.head_dim // 2)),
            ("rope_sin", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("classifier", (self.vocab_size, dim)))
        return shapes

    def file_size(self) -> int:
        floats = sum(torch.Size(shape).numel() for _, shape in self.tensor_shapes())
        return _HEADER.size + _FLOAT_BYTES * floats


def _parse_header(path: Path, raw: bytes) -> Llama2cHeader:
    if len(raw) < _HEADER.size:
        raise Llama2cFormatError(
            f"{path}: {len(raw)} bytes is shorter than the 28-byte llama2.c header; the file is truncated or not "
            "a llama2.c checkpoint"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = _HEADER.unpack_from(raw)
    if dim == _LLAMA2C_V1_MAGIC:
        raise Llama2cFormatError(
            f"{path}: this is a llama2.c version-1+ export (magic 'ak42'); only the legacy v0 format is supported. "
            "Re-export with llama2.c's `export.py --version 0`"
        )
    header = Llama2cHeader(
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len, shared_classifier=vocab_size > 0
    )
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len) <= 0:
        raise Llama2cFormatError(f"{path}: header has a zero or negative size field: {header}")
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise Llama2cFormatError(
            f"{path}: inconsistent header (dim must split into an even head_dim per head, and n_heads must be a "
            f"multiple of n_kv_heads): {header}"
        )
    return header


def read_llama2c_checkpoint(path: Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read a legacy-v0 checkpoint into its raw llama2.c tensors; the file size must match the header exactly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    raw = path.read_bytes()
    header = _parse_header(path, raw)
    expected = header.file_size()
    if len(raw) != expected:
        raise Llama2cFormatError(
            f"{path}: {len(raw):,} bytes, but the header {header} describes a {expected:,}-byte legacy-v0 file "
            f"({'truncated' if len(raw) < expected else 'trailing data'}); re-download or re-export the checkpoint"
        )
    flat = torch.frombuffer(bytearray(raw), dtype=torch.float32, offset=_HEADER.size)
    tensors, offset = {}, 0
    for name, shape in header.tensor_shapes():
        count = torch.Size(shape).numel()
        tensors[name] = flat[offset : offset + count].view(shape).clone()
        offset += count
    return header, tensors


def _adjacent_pairs_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder output rows inside each head: even rows first, then odd rows (llama2.c RoPE -> HF rotate_half)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    per_head = weight.view(n_heads, head_dim // 2, 2, in_features)
    return per_head.transpose(1, 2).reshape(out_features, in_features)


def _hf_state_dict(header: Llama2cHeader, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {
        "model.embed_tokens.weight": tensors["token_embedding"],
        "model.norm.weight": tensors["rms_final"],
        "lm_head.weight": tensors["token_embedding" if header.shared_classifier else "classifier"],
    }
    for layer in range(header.n_layers):
        prefix = f"model.layers.{layer}."
        state |= {
            prefix + "input_layernorm.weight": tensors["rms_att"][layer],
            prefix + "self_attn.q_proj.weight": _adjacent_pairs_to_rotate_half(tensors["wq"][layer], header.n_heads),
            prefix + "self_attn.k_proj.weight": _adjacent_pairs_to_rotate_half(
                tensors["wk"][layer], header.n_kv_heads
            ),
            prefix + "self_attn.v_proj.weight": tensors["wv"][layer],
            prefix + "self_attn.o_proj.weight": tensors["wo"][layer],
            prefix + "post_attention_layernorm.weight": tensors["rms_ffn"][layer],
            prefix + "mlp.gate_proj.weight": tensors["w1"][layer],
            prefix + "mlp.down_proj.weight": tensors["w2"][layer],
            prefix + "mlp.up_proj.weight": tensors["w3"][layer],
        }
    return {name: tensor.contiguous() for name, tensor in state.items()}


def _llama_config(header: Llama2cHeader) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        hidden_act="silu",
        max_position_embeddings=header.seq_len,
        rms_norm_eps=_RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA},
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        attention_bias=False,
        mlp_bias=False,
        dtype="float32",
    )


def _load_sentencepiece_proto(tokenizer_model: Path):
    from sentencepiece import sentencepiece_model_pb2

    if not Path(tokenizer_model).is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {tokenizer_model}")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(tokenizer_model).read_bytes())
    except Exception as error:  # protobuf raises DecodeError, whose module path varies between versions
        raise ValueError(f"{tokenizer_model} is not a SentencePiece model file: {error}") from error
    return proto


def _check_supported(proto, tokenizer_model: Path) -> None:
    """Refuse SentencePiece features this builder does not reproduce, rather than tokenize differently."""
    spec, normalizer = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type != _SENTENCEPIECE_BPE:
        problems.append(f"model_type {spec.model_type} (only BPE = {_SENTENCEPIECE_BPE} is supported)")
    if normalizer.precompiled_charsmap:
        problems.append(f"a precompiled normalisation rule ({normalizer.name!r}; only 'identity' is supported)")
    if not normalizer.escape_whitespaces or spec.treat_whitespace_as_suffix:
        problems.append("non-default whitespace handling (escape_whitespaces off or treat_whitespace_as_suffix)")
    if any(piece.type in (_USER_DEFINED, _UNUSED) for piece in proto.pieces):
        problems.append("user-defined or unused pieces")
    if problems:
        raise ValueError(f"{tokenizer_model}: unsupported SentencePiece features: " + "; ".join(problems))


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """Every split of every normal piece into two normal pieces, highest-scoring merged piece first.

    SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the best-scoring piece, which
    is what a rank-ordered merge list reproduces.
    """
    normal = {piece.piece: (-piece.score, index) for index, piece in enumerate(proto.pieces) if piece.type == _NORMAL}
    ranked = []
    for merged, rank in normal.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in normal and right in normal:
                ranked.append((rank, normal[left][1], normal[right][1], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _sentencepiece_normalizer(proto) -> normalizers.Normalizer:
    """SentencePiece's identity normaliser: optional whitespace clean-up, dummy prefix, spaces as U+2581."""
    steps = []
    if proto.normalizer_spec.remove_extra_whitespaces:  # only U+0020 counts as whitespace here, as in spm
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE_SYMBOL))  # tokenizers' Prepend leaves an empty string empty
    steps.append(normalizers.Replace(" ", _SPACE_SYMBOL))
    return normalizers.Sequence(steps)


def build_sentencepiece_tokenizer(tokenizer_model: Path, model_max_length: int) -> PreTrainedTokenizerFast:
    """A fast tokenizer that encodes exactly like `SentencePieceProcessor(model_file=tokenizer_model)`.

    bos is prepended (llama2.c trained on BOS + story tokens), eos is not. pad is the unknown token: byte
    fallback means `<unk>` never occurs in encoded text, so padding stays distinguishable from real tokens,
    whereas pad = eos would mask genuine end-of-story labels in training collators and make attention masks
    ambiguous in generation. Padding is on the right so position ids of real tokens start at 0.
    Control pieces written literally in the text (e.g. "<s>") are encoded as text, as SentencePiece does.
    """
    proto = _load_sentencepiece_proto(tokenizer_model)
    _check_supported(proto, tokenizer_model)
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    spec = proto.trainer_spec
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=_bpe_merges(proto),
            unk_token=proto.pieces[spec.unk_id].piece,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    )
    backend.normalizer = _sentencepiece_normalizer(proto)
    # No pre-tokenizer: SentencePiece runs BPE over the whole normalised string.
    decode_steps = [decoders.Replace(_SPACE_SYMBOL, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(decode_steps)
    backend.add_special_tokens(
        [
            AddedToken(piece.piece, special=True, normalized=False)
            for piece in proto.pieces
            if piece.type in (_CONTROL, _UNKNOWN)
        ]
    )

    unk, bos, eos = (proto.pieces[index].piece for index in (spec.unk_id, spec.bos_id, spec.eos_id))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=unk,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=model_max_length,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, output_dir: Path) -> None:
    """Save, naming the class `PreTrainedTokenizerFast` so transformers 4 (vLLM <= 0.18.1) loads it too.

    transformers 5 writes its internal class name `TokenizersBackend`, which transformers 4 lacks; both versions
    map `PreTrainedTokenizerFast` to the generic class that serves tokenizer.json unchanged.
    """
    tokenizer.save_pretrained(output_dir)
    config_path = output_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def convert_llama2c(checkpoint: Path, tokenizer_model: Path, output_dir: Path, overwrite: bool = False) -> Path:
    """Write a transformers Llama checkpoint (safetensors) plus tokenizer for a llama2.c legacy-v0 model.
    A non-empty ``output_dir`` is replaced only with ``overwrite``, and only once the conversion succeeded."""
    refused = refuse_existing_output(output_dir, overwrite)
    if refused:
        raise FileExistsError(refused)
    header, tensors = read_llama2c_checkpoint(Path(checkpoint))
    tokenizer = build_sentencepiece_tokenizer(Path(tokenizer_model), model_max_length=header.seq_len)
    if len(tokenizer) != header.vocab_size:
        raise ValueError(
            f"{tokenizer_model} has {len(tokenizer)} pieces but {checkpoint} has vocab_size {header.vocab_size}; "
            "pair the checkpoint with the tokenizer it was trained with"
        )
    config = _llama_config(header)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(_hf_state_dict(header, tensors), assign=True, strict=True)
    if header.shared_classifier:
        model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, pad_token_id=tokenizer.pad_token_id
    )
    output_dir = Path(output_dir)
    with staged_output(output_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        _save_tokenizer(tokenizer, staging)
    logger.info(f"converted {checkpoint} ({header}) -> {output_dir}")
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="llama2.c legacy-v0 .bin file")
    parser.add_argument("tokenizer_model", type=Path, help="the SentencePiece .model it was trained with")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    args = parser.parse_args(argv)
    convert_llama2c(args.checkpoint, args.tokenizer_model, args.output_dir, args.overwrite)


if __name__ == "__main__":
    main()
