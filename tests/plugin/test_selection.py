"""The residual site's end-to-end candidate ranking: its loss is the loss of the model that folding
the candidate and pruning would produce."""

from __future__ import annotations

import copy

import pytest
import torch

from learned_permutation.plugin.selection import SimulatedPruning, calibration_sample, next_token_loss
from learned_permutation.plugin.statistics import InputStatistics
from learned_permutation.structure import find_sites, fold_permutation
from llmcompressor.modifiers.utils.hooks import HooksMixin
from tiny_models import build_tiny_model

N, M = 2, 4


class Hooks(HooksMixin):
    """A stand-in owner for the simulation's hooks (a modifier in production)."""


def batches(vocab: int, seed: int = 0, count: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, 2, 20), generator=generator)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]


def targeted_linears(model) -> list[torch.nn.Linear]:
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]


def input_energy(model, data) -> dict:
    stats = InputStatistics(full=False)
    handles = [m.register_forward_hook(stats.hook) for m in targeted_linears(model)]
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for handle in handles:
        handle.remove()
    return stats.pop(targeted_linears(model))


def wanda_prune_in_storage_order(model, act_sq: dict) -> None:
    """Wanda's N:M mask computed directly, group by group, on the stored weights."""
    with torch.no_grad():
        for module in targeted_linears(model):
            score = module.weight.abs() * act_sq[module].sqrt()
            groups = score.reshape(score.shape[0], -1, M)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(N, dim=-1).indices, True)
            module.weight.mul_(keep.reshape(score.shape))


def test_next_token_loss_is_the_models_own_loss():
    model = build_tiny_model("llama")
    data = batches(model.config.vocab_size)
    with torch.no_grad():
        expected = sum(float(model(**b, labels=b["input_ids"]).loss) for b in data) / len(data)
    assert next_token_loss(model, data) == pytest.approx(expected, rel=1e-5)


def test_next_token_loss_ignores_padding():
    model = build_tiny_model("llama")
    ids = batches(model.config.vocab_size, count=1)[0]["input_ids"][:1]
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=ids.dtype)], dim=1)
    assert next_token_loss(model, [{"input_ids": padded, "attention_mask": mask}]) == pytest.approx(
        next_token_loss(model, [{"input_ids": ids}]), rel=1e-5
    )


def test_calibration_sample_is_bounded_order_free_and_loss_preserving():
    model = build_tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (5, 20), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[i : i + 1, : 8 + 3 * i]} for i in range(5)]
    whole = calibration_sample(rows, tokens=1000)
    assert int(whole["attention_mask"].sum()) == sum(8 + 3 * i for i in range(5))
    assert next_token_loss(model, [whole]) == pytest.approx(next_token_loss(model, rows), rel=1e-5)
    shuffled = calibration_sample(rows[::-1], tokens=30)
    assert torch.equal(shuffled["input_ids"], calibration_sample(rows, tokens=30)["input_ids"])
    assert int(shuffled["attention_mask"].sum()) == 30


def test_next_token_loss_rejects_data_without_token_pairs():
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="no pair of consecutive tokens"):
        next_token_loss(model, [{"input_ids": torch.tensor([[5]])}])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_simulated_loss_is_the_loss_of_the_folded_pruned_model(kind):
    model = build_tiny_model(kind)
    data = batches(model.config.vocab_size)
    act_sq = input_energy(model, data)
    residual = find_sites(model, M, kinds=("residual",))[0]
    readers = [named.module for named in residual.consumer_modules if named.module in act_sq]
    perm = torch.randperm(residual.size, generator=torch.Generator().manual_seed(3))
    dense_loss = next_token_loss(model, data)

    simulated = SimulatedPruning(Hooks(), act_sq, "wanda", N, M).loss(model, data, dict.fromkeys(readers, perm), "random")

    folded = copy.deepcopy(model)
    fold_permutation(folded, find_sites(folded, M, kinds=("residual",))[0], perm)
    folded_act_sq = input_energy(folded, data)
    wanda_prune_in_storage_order(folded, folded_act_sq)
    assert simulated == pytest.approx(next_token_loss(folded, data), rel=1e-4)
    assert simulated > dense_loss
    assert next_token_loss(model, data) == dense_loss  # the hooks are gone


def test_simulated_loss_depends_on_the_permutation():
    model = build_tiny_model("llama")
    data = batches(model.config.vocab_size)
    act_sq = input_energy(model, data)
    residual = find_sites(model, M, kinds=("residual",))[0]
    readers = [named.module for named in residual.consumer_modules if named.module in act_sq]
    simulation = SimulatedPruning(Hooks(), act_sq, "wanda", N, M)
    identity = simulation.loss(model, data, {}, "identity")
    shuffled = simulation.loss(model, data, dict.fromkeys(readers, torch.randperm(residual.size)), "shuffled")
    assert identity != pytest.approx(shuffled, rel=1e-6)
