"""The solver's view of a site (`consumers_from_stats`) predicts what happens in the folded model."""

from __future__ import annotations

import copy

import pytest
import torch
from structure_models import build_model, random_site_permutation, sample_tokens

from learned_permutation.math.masks import nm_mask
from learned_permutation.math.objectives import reconstruction_error, retained_score
from learned_permutation.math.scores import score
from learned_permutation.structure import find_sites, fold_permutation

N, M = 2, 4


@torch.no_grad()
def linear_inputs(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Linear's calibration inputs, flattened to [tokens, in_features], by module name."""
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(
                module.register_forward_hook(
                    lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
                )
            )
    model(input_ids=tokens)
    for hook in hooks:
        hook.remove()
    return inputs


def query_head_replicas(site, in_features: int) -> list[torch.Tensor]:
    """o_proj columns grouped by replica: query head h is replica h % query_groups (independent of the site code)."""
    if site.kind != "attn_vo":
        return [torch.arange(in_features)]
    head = torch.arange(in_features) // site.block_size
    return [(head % site.query_groups == r).nonzero().flatten() for r in range(site.query_groups)]


def direct_wanda_error(site, folded_model, inputs) -> float:
    """Wanda N:M reconstruction error measured on the folded model's own weights and activations."""
    lost = energy = 0.0
    for named in site.consumer_modules:
        weight = folded_model.get_submodule(named.name).weight.detach()
        x = inputs[named.name]
        delta = weight * ~nm_mask(score("wanda", weight, act_sq=x.square().sum(0)), N, M)
        for columns in query_head_replicas(site, weight.shape[1]):
            lost += float((x[:, columns] @ delta[:, columns].T).square().sum())
            energy += float((x[:, columns] @ weight[:, columns].T).square().sum())
    return lost / energy


@pytest.mark.parametrize(
    "variant", ["llama_mha_untied_biases", "llama_gqa_tied", "mistral_one_kv_head", "qwen3_qk_norm"]
)
def test_objective_from_stats_equals_direct_measurement_after_folding(variant):
    model = build_model(variant)
    tokens = sample_tokens(model.config.vocab_size)
    inputs = linear_inputs(model, tokens)
    hessians = {model.get_submodule(name): x.T @ x for name, x in inputs.items()}
    generator = torch.Generator().manual_seed(5)
    for site in find_sites(model, M):
        perm = random_site_permutation(site, generator)
        predicted = reconstruction_error(site.consumers_from_stats(hessians), perm, N, M, "wanda", site.block_size)

        folded = copy.deepcopy(model)
        fold_permutation(folded, next(s for s in find_sites(folded, M) if s.name == site.name), perm)
        measured = direct_wanda_error(site, folded, linear_inputs(folded, tokens))
        assert predicted == pytest.approx(measured, rel=1e-4), site.name


def test_act_sq_stats_by_name_give_the_retained_score_of_the_folded_model():
    model = build_model("llama_gqa_tied")
    tokens = sample_tokens(model.config.vocab_size)
    act_sq = {name: x.square().sum(0) for name, x in linear_inputs(model, tokens).items()}
    attention = find_sites(model, M, kinds=("attn_vo",))[1]
    perm = random_site_permutation(attention, torch.Generator().manual_seed(2))
    predicted = retained_score(attention.consumers_from_stats(act_sq), perm, N, M, "wanda", attention.block_size)

    fold_permutation(model, attention, perm)
    o_proj_inputs = linear_inputs(model, tokens)["model.layers.1.self_attn.o_proj"]
    o_proj = model.model.layers[1].self_attn.o_proj
    folded_scores = score("wanda", o_proj.weight.detach(), act_sq=o_proj_inputs.square().sum(0))
    measured = float((folded_scores * nm_mask(folded_scores, N, M)).sum() / folded_scores.sum())
    assert predicted == pytest.approx(measured, rel=1e-5)


def test_only_modules_with_stats_become_consumers_one_per_replica():
    model = build_model("mistral_one_kv_head")  # 4 query heads share 1 KV head
    residual, attention = find_sites(model, M, kinds=("residual", "attn_vo"))[:2]
    layer = model.model.layers[0]
    stats = {
        layer.self_attn.q_proj: torch.ones(32),
        "model.layers.0.mlp.up_proj": torch.eye(32),
        layer.self_attn.o_proj: torch.ones(32),
    }
    residual_consumers = residual.consumers_from_stats(stats)
    assert [c.weight.shape for c in residual_consumers] == [(32, 32), (48, 32)]
    assert residual_consumers[1].hessian is not None and residual_consumers[0].hessian is None
    replicas = attention.consumers_from_stats(stats)
    assert len(replicas) == 4 and all(c.weight.shape == (32, 8) for c in replicas)
    assert torch.equal(replicas[3].weight, layer.self_attn.o_proj.weight[:, 24:32])


def test_stat_with_wrong_shape_names_module():
    model = build_model("llama_gqa_tied")
    mlp = find_sites(model, M, kinds=("mlp",))[0]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj has shape \(32,\)"):
        mlp.consumers_from_stats({"model.layers.0.mlp.down_proj": torch.ones(32)})
