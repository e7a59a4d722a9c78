"""Folding is exact: outputs unchanged, weights permuted, permutations compose, bad input rejected."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from structure_models import (
    STRUCTURE_VARIANTS,
    assert_same_logits,
    build_model,
    logits_of,
    random_site_permutation,
    sample_tokens,
)

import learned_permutation
from learned_permutation.structure import find_sites, fold_permutation, fold_permutations
from learned_permutation.structure import folding

STORIES260K_DIR = Path(learned_permutation.__file__).parent / "assets" / "stories260k"


def fold_random_permutations(model, seed=0, kinds=("residual", "mlp", "attn_vo")):
    """Fold a random permutation at every site; returns {site name: permutation}."""
    generator = torch.Generator().manual_seed(seed)
    perms = {}
    for site in find_sites(model, 4, kinds=kinds):
        perms[site.name] = random_site_permutation(site, generator)
        fold_permutation(model, site, perms[site.name])
    return perms


@pytest.mark.parametrize("variant", sorted(STRUCTURE_VARIANTS))
def test_folding_every_site_keeps_logits_and_changes_weights(variant):
    model = build_model(variant)
    original = copy.deepcopy(model)
    tokens = sample_tokens(model.config.vocab_size)

    fold_random_permutations(model)

    assert_same_logits(logits_of(original, tokens), logits_of(model, tokens))
    changed = {
        name
        for name, param in model.named_parameters()
        if not torch.equal(param, original.get_parameter(name))
    }
    untouched = {name for name, _ in model.named_parameters()} - changed
    # only what lives on q/k's output side (their biases, Qwen3's head_dim norms) stays as it was
    assert all(name.endswith(("q_norm.weight", "k_norm.weight", "q_proj.bias", "k_proj.bias")) for name in untouched), (
        untouched
    )


def test_folding_every_site_of_the_embedded_stories260k_keeps_logits():
    if not (STORIES260K_DIR / "config.json").is_file():
        pytest.skip(f"embedded stories260K model not converted yet (no {STORIES260K_DIR / 'config.json'})")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES260K_DIR, dtype=torch.float32).eval()
    original = copy.deepcopy(model)
    tokens = sample_tokens(model.config.vocab_size)
    perms = fold_random_permutations(model)
    assert len(perms) == 1 + 2 * model.config.num_hidden_layers
    assert_same_logits(logits_of(original, tokens), logits_of(model, tokens))
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("variant", sorted(STRUCTURE_VARIANTS))
def test_each_tensor_is_permuted_along_the_right_axis(variant):
    model = build_model(variant)
    original = copy.deepcopy(model)
    perms = fold_random_permutations(model)
    residual = perms["residual"]
    layer, before = model.model.layers[0], original.model.layers[0]
    mlp_perm = perms["model.layers.0.mlp"]
    attention_site = find_sites(model, 4, kinds=("attn_vo",))[0]
    head_perm = perms["model.layers.0.self_attn"]

    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight[:, residual])
    assert torch.equal(model.lm_head.weight, original.lm_head.weight[:, residual])
    assert torch.equal(model.model.norm.weight, original.model.norm.weight[residual])
    # q/k outputs (rows) are never permuted, only their residual input columns
    assert torch.equal(layer.self_attn.q_proj.weight, before.self_attn.q_proj.weight[:, residual])
    assert torch.equal(layer.self_attn.k_proj.weight, before.self_attn.k_proj.weight[:, residual])
    assert torch.equal(layer.self_attn.v_proj.weight, before.self_attn.v_proj.weight[head_perm][:, residual])
    o_columns = attention_site.consumer_column_index(head_perm)
    assert torch.equal(layer.self_attn.o_proj.weight, before.self_attn.o_proj.weight[residual][:, o_columns])
    assert torch.equal(layer.mlp.up_proj.weight, before.mlp.up_proj.weight[mlp_perm][:, residual])
    assert torch.equal(layer.mlp.down_proj.weight, before.mlp.down_proj.weight[residual][:, mlp_perm])
    if layer.self_attn.v_proj.bias is not None:
        assert torch.equal(layer.self_attn.v_proj.bias, before.self_attn.v_proj.bias[head_perm])
        assert torch.equal(layer.self_attn.q_proj.bias, before.self_attn.q_proj.bias)
    if layer.mlp.down_proj.bias is not None:
        assert torch.equal(layer.mlp.down_proj.bias, before.mlp.down_proj.bias[residual])
        assert torch.equal(layer.mlp.gate_proj.bias, before.mlp.gate_proj.bias[mlp_perm])
        assert torch.equal(layer.self_attn.o_proj.bias, before.self_attn.o_proj.bias[residual])


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_biases_tied"])
def test_tied_embeddings_stay_tied_and_are_permuted_once(variant):
    model = build_model(variant)
    embedding = model.model.embed_tokens.weight.detach().clone()
    residual = find_sites(model, 4, kinds=("residual",))[0]
    perm = torch.randperm(residual.size, generator=torch.Generator().manual_seed(1))
    fold_permutation(model, residual, perm)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding[:, perm])


def test_qwen3_head_dim_norms_are_untouched():
    model = build_model("qwen3_qk_norm")
    q_norm = model.model.layers[1].self_attn.q_norm.weight.detach().clone()
    fold_random_permutations(model)
    assert torch.equal(model.model.layers[1].self_attn.q_norm.weight, q_norm)


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "mistral_one_kv_head"])
def test_folding_p_then_q_equals_folding_their_composition(variant):
    twice, once = build_model(variant), build_model(variant)
    generator = torch.Generator().manual_seed(3)
    for site_twice, site_once in zip(find_sites(twice, 4), find_sites(once, 4)):
        first = random_site_permutation(site_twice, generator)
        second = random_site_permutation(site_twice, generator)
        fold_permutation(twice, site_twice, first)
        fold_permutation(twice, site_twice, second)
        # position j holds channel second[j] of the first folding, i.e. original channel first[second[j]]
        fold_permutation(once, site_once, first[second])
    for name, param in once.named_parameters():
        assert torch.equal(param, twice.get_parameter(name)), name


@pytest.mark.parametrize("variant", sorted(STRUCTURE_VARIANTS))
def test_folding_all_sites_at_once_writes_each_parameter_once_as_one_by_one_would(variant, monkeypatch):
    """On an offloaded model every write is a copy to the offload storage (and every read one to the
    device): ``down_proj`` belongs to the residual and to the MLP site, so it must still cross once."""
    one_by_one, at_once = build_model(variant), build_model(variant)
    perms = fold_random_permutations(one_by_one)
    writes = []

    def counted(module, name, value):
        writes.append((id(module), name))
        write_parameter(module, name, value)

    write_parameter = folding.write_parameter
    monkeypatch.setattr(folding, "write_parameter", counted)
    fold_permutations(at_once, {site: perms[site.name] for site in find_sites(at_once, 4)})

    assert len(writes) == len(set(writes)), "a parameter was written more than once"
    assert {(id(m), "weight") for m in (at_once.model.layers[0].mlp.down_proj, at_once.model.layers[0].self_attn.o_proj)} <= set(writes)
    for name, param in one_by_one.named_parameters():
        assert torch.equal(param, at_once.get_parameter(name)), name


def test_folding_several_sites_checks_every_permutation_before_writing_any():
    model = build_model("llama_gqa_tied")
    before = copy.deepcopy(model.state_dict())
    sites = find_sites(model, 4)
    generator = torch.Generator().manual_seed(0)
    perms = {site: random_site_permutation(site, generator) for site in sites}
    perms[sites[-1]] = torch.zeros(sites[-1].size, dtype=torch.long)
    with pytest.raises(ValueError, match="not a permutation"):
        fold_permutations(model, perms)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("perm", "message"),
    [
        (torch.arange(15), r"vector of 16 channel indices"),
        (torch.zeros(16, dtype=torch.long), r"not a permutation"),
        (torch.arange(16).float(), r"integer indices"),
        (torch.arange(16).roll(1), r"across blocks of 8"),
        (torch.arange(1, 17), r"not a permutation"),
    ],
    ids=["short", "repeated", "float", "crosses_head", "out_of_range"],
)
def test_bad_permutations_are_rejected_naming_the_site(perm, message):
    model = build_model("llama_gqa_tied")
    attention = find_sites(model, 4, kinds=("attn_vo",))[0]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"site model\.layers\.0\.self_attn \(attn_vo\): .*{message}"):
        fold_permutation(model, attention, perm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_site_from_another_model_is_rejected():
    model, other = build_model("llama_gqa_tied"), build_model("llama_gqa_tied")
    site = find_sites(other, 4, kinds=("mlp",))[0]
    with pytest.raises(ValueError, match="different model"):
        fold_permutation(model, site, torch.arange(site.size))
