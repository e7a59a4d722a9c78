"""Registry lookups and the error for architectures we cannot fold."""

from __future__ import annotations

import pytest
from structure_models import STRUCTURE_VARIANTS, build_model
from transformers import GPT2Config, GPT2LMHeadModel, PhiConfig, PhiForCausalLM

from learned_permutation.structure import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitectureError,
    find_sites,
    mapping_for,
)


@pytest.mark.parametrize("variant", sorted(STRUCTURE_VARIANTS))
def test_every_supported_class_has_a_mapping_matching_its_config(variant):
    model = build_model(variant)
    mapping = mapping_for(model)
    assert mapping.class_name == type(model).__name__
    assert mapping.model_type == model.config.model_type
    attention = mapping.attention_shape(model.config)
    assert attention.num_kv_heads * attention.head_dim == model.model.layers[0].self_attn.v_proj.out_features
    assert attention.num_heads * attention.head_dim == model.model.layers[0].self_attn.o_proj.in_features


def test_registry_covers_the_four_documented_classes():
    assert set(SUPPORTED_ARCHITECTURES) == {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    }


def test_qwen2_head_dim_falls_back_to_hidden_over_heads():
    config = STRUCTURE_VARIANTS["qwen2_biases_tied"]()
    assert getattr(config, "head_dim", None) is None  # Qwen2's config does not carry head_dim
    shape = SUPPORTED_ARCHITECTURES["Qwen2ForCausalLM"].attention_shape(config)
    assert shape.head_dim == config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize(
    "model",
    [
        GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)),
        PhiForCausalLM(
            PhiConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        ),
    ],
    ids=["gpt2", "phi"],
)
def test_unsupported_architecture_names_the_model_and_lists_supported(model):
    with pytest.raises(UnsupportedArchitectureError) as raised:
        find_sites(model, 4)
    message = str(raised.value)
    assert type(model).__name__ in message and repr(model.config.model_type) in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)
    assert isinstance(raised.value, ValueError)
