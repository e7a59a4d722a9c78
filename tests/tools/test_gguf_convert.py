"""GGUF -> Hugging Face conversion, on a tiny GGUF written here with gguf's own writer (no download).

The GGUF is laid out as llama.cpp's converter lays a Llama out: q/k rows interleaved per head, one
tensor quantized (Q8_0), a byte-level BPE tokenizer. The converted checkpoint must compute what the
source model computes (with the quantized tensor replaced by its de-quantized value), carry no GGUF
quantization config, and state ``rope_theta`` at the top level of config.json.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from learned_permutation.tools.gguf_convert import convert_gguf, greedy_continuation

gguf = pytest.importorskip("gguf")

ROPE_THETA = 50000.0
HEADS, KV_HEADS = 4, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QUANTIZED = "model.layers.0.mlp.down_proj.weight"


def interleave_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, the two rotary halves interleaved row by row."""
    out, cols = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, cols).transpose(1, 2).reshape(out, cols)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def byte_tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    return SPECIAL + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "hel", "Ġt"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(reference model with the de-quantized tensor, path of the GGUF written from it)."""
    tokens = byte_tokens()
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         rope_theta=ROPE_THETA, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(["h e", "he l", "Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight":  # tied: GGUF stores no output.weight
                continue
            data = tensor.float()
            if name.endswith("q_proj.weight"):
                data = interleave_rows(data, HEADS)
            elif name.endswith("k_proj.weight"):
                data = interleave_rows(data, KV_HEADS)
            array = data.numpy()
            if name == QUANTIZED:
                packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(gguf_name(name), packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                dequantized = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
                model.get_parameter(name).copy_(torch.from_numpy(dequantized.reshape(array.shape)))
            else:
                writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    return convert_gguf(source[1], tmp_path_factory.mktemp("converted") / "model")


def test_converted_weights_and_logits_match_the_source(source, converted):
    reference, _ = source
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert type(model) is LlamaForCausalLM
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_quantized_tensor_really_is_quantized(source):
    """Guards the test above: a Q8_0 round trip changes the weights, so an exact match means the
    converter de-quantized them rather than the fixture writing floats."""
    reference, _ = source
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(reference.config).eval()
    assert not torch.equal(fresh.get_parameter(QUANTIZED), reference.get_parameter(QUANTIZED))


def test_config_is_plain_with_top_level_rope_theta(converted):
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["rope_theta"] == ROPE_THETA
    assert config["rope_parameters"]["rope_theta"] == ROPE_THETA
    assert config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)


def test_tokenizer_and_greedy_continuation(source, converted):
    reference, _ = source
    tokenizer = AutoTokenizer.from_pretrained(converted)
    text = "hello there, tokens!"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.convert_tokens_to_ids("hel") == len(byte_tokens()) - 2  # the merges came through
    ids = tokenizer("hello", return_tensors="pt")
    with torch.no_grad():
        expected = reference.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert greedy_continuation(converted, "hello", 4) == tokenizer.decode(
        expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
