from __future__ import annotations

import pytest
import torch

from learned_permutation.math import Consumer, nm_mask, reconstruction_error, retained_score, score


def test_reconstruction_error_matches_the_outputs_it_describes(make_consumer):
    consumer, inputs = make_consumer(6, 16, seed=2)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    permuted = consumer.weight[:, perm]
    pruned = permuted * nm_mask(score("wanda", permuted, act_sq=consumer.act_sq[perm]), 2, 4)
    lost = (inputs[:, perm] @ (permuted - pruned).T).square().sum()
    expected = lost / (inputs @ consumer.weight.T).square().sum()
    assert reconstruction_error([consumer], perm, 2, 4, "wanda") == pytest.approx(float(expected), rel=1e-4)


def _group_shuffles(channels: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randperm(channels, generator=generator)
    inside = base.reshape(-1, m)[:, torch.randperm(m, generator=generator)].reshape(-1)
    reordered_groups = base.reshape(-1, m)[torch.randperm(channels // m, generator=generator)].reshape(-1)
    return base, torch.stack([inside, reordered_groups])


@pytest.mark.parametrize("objective", [retained_score, reconstruction_error])
@pytest.mark.parametrize("kind", ["magnitude", "wanda", "ria", "sparsegpt"])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_objectives_ignore_order_inside_groups_and_of_groups(objective, kind, n, m, make_consumer):
    consumers = [make_consumer(5, 24, seed=1)[0], make_consumer(3, 24, seed=4)[0]]
    base, variants = _group_shuffles(24, m, seed=7)
    reference = objective(consumers, base, n, m, kind)
    for variant in variants:
        assert objective(consumers, variant, n, m, kind) == pytest.approx(reference, rel=1e-5)


def test_objectives_see_the_permutation(make_consumer):
    consumer = make_consumer(8, 16, seed=5)[0]
    values = {reconstruction_error([consumer], torch.randperm(16), 2, 4, "wanda") for _ in range(5)}
    assert len(values) > 1


def test_diagonal_statistics_give_the_diagonal_objective(make_consumer):
    consumer = make_consumer(4, 8, seed=3)[0]
    diagonal = Consumer(consumer.weight, act_sq=consumer.act_sq)
    full_diagonal = Consumer(consumer.weight, hessian=torch.diag(consumer.act_sq))
    perm = torch.randperm(8)
    assert reconstruction_error([diagonal], perm, 2, 4, "wanda") == pytest.approx(
        reconstruction_error([full_diagonal], perm, 2, 4, "wanda"), rel=1e-5
    )


def test_objective_errors(make_consumer):
    consumer = make_consumer(4, 8)[0]
    with pytest.raises(ValueError, match="not a permutation"):
        retained_score([consumer], torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]), 2, 4, "wanda")
    with pytest.raises(ValueError, match="across blocks"):
        retained_score([consumer], torch.tensor([4, 1, 2, 3, 0, 5, 6, 7]), 2, 4, "wanda", block_size=4)
    with pytest.raises(ValueError, match="not divisible by M=8"):
        retained_score([make_consumer(4, 12)[0]], torch.arange(12), 4, 8, "wanda")
    with pytest.raises(ValueError, match="disagree"):
        retained_score([consumer, make_consumer(4, 12)[0]], torch.arange(8), 2, 4, "wanda")
    with pytest.raises(ValueError, match="needs a hessian or act_sq"):
        reconstruction_error([Consumer(torch.ones(2, 8))], torch.arange(8), 2, 4, "magnitude")


@pytest.mark.parametrize("objective", [retained_score, reconstruction_error])
def test_objectives_ignore_group_order_inside_blocks(objective, make_consumer):
    consumers = [make_consumer(5, 24, seed=6)[0]]
    generator = torch.Generator().manual_seed(9)
    base = torch.cat([torch.randperm(8, generator=generator) + offset for offset in (0, 8, 16)])
    grouped = base.reshape(3, 2, 4)  # blocks of 8 channels hold two 4-groups
    swapped_groups = grouped.flip(1).reshape(-1)
    shuffled_slots = grouped[..., torch.randperm(4, generator=generator)].reshape(-1)
    reference = objective(consumers, base, 2, 4, "wanda", block_size=8)
    for variant in (swapped_groups, shuffled_slots):
        assert objective(consumers, variant, 2, 4, "wanda", block_size=8) == pytest.approx(reference, rel=1e-5)


def test_weighted_rows_scale_each_row_by_the_square_root_of_its_sensitivity():
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    consumer = Consumer(weight=weight, act_sq=torch.ones(8))
    weighted = consumer.weighted_rows(torch.tensor([4.0, 1.0, 0.25]))
    assert torch.allclose(weighted.weight, weight * torch.tensor([[2.0], [1.0], [0.5]]))
    assert weighted.act_sq is consumer.act_sq
    with pytest.raises(ValueError, match="does not match the weight's 3 output rows"):
        consumer.weighted_rows(torch.ones(8))
