"""Site discovery: which modules each site touches, its size and block structure, foldability."""

from __future__ import annotations

import pytest
import torch
from structure_models import STRUCTURE_VARIANTS, build_model
from transformers import LlamaConfig

from learned_permutation.structure import SiteNotFoldableError, find_sites


def _names(named_modules):
    return [named.name for named in named_modules]


def test_sites_of_a_gqa_llama():
    model = build_model("llama_gqa_tied")
    sites = find_sites(model, 4)
    assert [(s.name, s.kind, s.layer_index) for s in sites] == [
        ("residual", "residual", None),
        ("model.layers.0.self_attn", "attn_vo", 0),
        ("model.layers.0.mlp", "mlp", 0),
        ("model.layers.1.self_attn", "attn_vo", 1),
        ("model.layers.1.mlp", "mlp", 1),
    ]
    residual, attention, mlp = sites[0], sites[1], sites[2]

    assert (residual.size, residual.block_size) == (32, None)
    assert _names(residual.producers) == [
        "model.embed_tokens",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    readers = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert _names(residual.consumer_modules) == [
        f"model.layers.{i}.{r}" for i in range(2) for r in readers
    ] + ["lm_head"]
    assert _names(residual.norms) == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    ]

    # 2 KV heads of head_dim 8, each read by 2 query heads
    assert (attention.size, attention.block_size, attention.query_groups) == (16, 8, 2)
    assert _names(attention.producers) == ["model.layers.0.self_attn.v_proj"]
    assert _names(attention.consumer_modules) == ["model.layers.0.self_attn.o_proj"]
    assert attention.consumer_modules[0].module is model.model.layers[0].self_attn.o_proj

    assert (mlp.size, mlp.block_size) == (48, None)
    assert _names(mlp.producers) == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert _names(mlp.consumer_modules) == ["model.layers.0.mlp.down_proj"]


def test_kinds_select_sites():
    model = build_model("qwen3_qk_norm")
    assert {s.kind for s in find_sites(model, 4, kinds=("mlp",))} == {"mlp"}
    assert [s.name for s in find_sites(model, 4, kinds=["residual"])] == ["residual"]
    with pytest.raises(ValueError, match="unknown site kinds"):
        find_sites(model, 4, kinds=("attention",))


def test_attention_consumer_index_repeats_kv_permutation_for_each_query_head():
    model = build_model("llama_gqa_tied")  # 4 query heads read 2 KV heads of head_dim 8
    attention = find_sites(model, 4, kinds=("attn_vo",))[0]
    perm = torch.cat([torch.arange(8).flip(0), 8 + torch.arange(8).roll(1)])
    index = attention.consumer_column_index(perm)
    expected = torch.cat([perm[:8], perm[:8] + 8, perm[8:] + 8, perm[8:] + 16])  # heads 0,1 -> kv 0; 2,3 -> kv 1
    assert torch.equal(index, expected)
    # replica r holds the o_proj columns of query heads r and 2 + r, in KV-channel order
    replicas = attention.replica_columns()
    assert torch.equal(replicas[0], torch.cat([torch.arange(0, 8), torch.arange(16, 24)]))
    assert torch.equal(replicas[1], torch.cat([torch.arange(8, 16), torch.arange(24, 32)]))


def test_head_dim_not_divisible_by_m_names_site_and_fix():
    config = LlamaConfig(
        vocab_size=32, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
    )  # head_dim 6
    model = build_model(config)
    expected = r"model\.layers\.0\.self_attn.*head_dim=6.*M=4.*Leave 'attn_vo' out"
    with pytest.raises(SiteNotFoldableError, match=expected):
        find_sites(model, 4)
    assert [s.kind for s in find_sites(model, 4, kinds=("residual", "mlp"))] == ["residual", "mlp"]
    assert len(find_sites(model, 2)) == 3  # M=2 divides head_dim 6


def test_intermediate_size_not_divisible_by_m_names_site():
    config = STRUCTURE_VARIANTS["llama_gqa_tied"]()
    config.intermediate_size = 50
    with pytest.raises(SiteNotFoldableError, match=r"model\.layers\.0\.mlp \(mlp\) has 50 channels.*M=4"):
        find_sites(build_model(config), 4)


def test_hidden_size_not_divisible_by_m_names_residual():
    config = STRUCTURE_VARIANTS["llama_gqa_tied"]()
    with pytest.raises(SiteNotFoldableError, match=r"site residual \(residual\) has 32 channels.*M=12"):
        find_sites(build_model(config), 12)


def test_mapping_mismatch_is_reported_not_folded_wrongly():
    model = build_model("qwen3_qk_norm")
    model.config.head_dim = 8  # lie: modules were built with head_dim 16
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn.*v_proj carries 32 channels, expected 16"):
        find_sites(model, 4)
