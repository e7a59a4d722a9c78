from __future__ import annotations

import pytest
import torch

from learned_permutation.math import SCORE_KINDS, Consumer, nm_mask, parse_mask_structure, score
from learned_permutation.math.masks import pack_bits, unpack_bits


@pytest.mark.parametrize("structure, expected", [("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 4 ", (1, 4))])
def test_parse_mask_structure(structure, expected):
    assert parse_mask_structure(structure) == expected


@pytest.mark.parametrize("structure", ["124", "2-4", "4:4", "0:4", "5:4", "a:b"])
def test_parse_mask_structure_rejects(structure):
    with pytest.raises(ValueError, match="N:M|N < M"):
        parse_mask_structure(structure)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_the_top_n_of_each_group(n, m):
    scores = torch.randn(5, 3 * m, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(scores, n, m)
    grouped_scores, grouped_mask = scores.reshape(5, 3, m), mask.reshape(5, 3, m)
    assert (grouped_mask.sum(-1) == n).all()
    smallest_kept = grouped_scores.masked_fill(~grouped_mask, torch.inf).min(-1).values
    largest_dropped = grouped_scores.masked_fill(grouped_mask, -torch.inf).max(-1).values
    assert (smallest_kept > largest_dropped).all()


def test_nm_mask_rejects_indivisible_dimension():
    with pytest.raises(ValueError, match="not divisible by M=8"):
        nm_mask(torch.randn(2, 172), 4, 8)


def test_scores_follow_their_definitions():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 8, generator=generator)
    inputs = torch.randn(32, 8, generator=generator)
    hessian = inputs.T @ inputs
    act_sq = hessian.diagonal()
    assert torch.allclose(score("magnitude", weight), weight.abs())
    assert torch.allclose(score("wanda", weight, act_sq=act_sq), weight.abs() * act_sq.sqrt())
    assert torch.allclose(score("wanda_energy", weight, act_sq=act_sq), weight.square() * act_sq)
    magnitude = weight.abs()
    relative = magnitude / magnitude.sum(1, keepdim=True) + magnitude / magnitude.sum(0, keepdim=True)
    assert torch.allclose(score("ria", weight, act_sq=act_sq), relative * act_sq.sqrt().sqrt())
    damped = hessian + 0.01 * act_sq.mean() * torch.eye(8)
    expected = weight.square() / torch.linalg.inv(damped).diagonal()
    assert torch.allclose(score("sparsegpt", weight, hessian=hessian), expected, rtol=1e-4)
    # without a Hessian the SparseGPT score falls back to the diagonal
    assert torch.allclose(
        score("sparsegpt", weight, act_sq=act_sq), weight.square() * (act_sq + 0.01 * act_sq.mean()), rtol=1e-5
    )


def test_scores_are_permutation_equivariant():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 12, generator=generator)
    inputs = torch.randn(40, 12, generator=generator)
    hessian = inputs.T @ inputs
    perm = torch.randperm(12, generator=generator)
    for kind in SCORE_KINDS:
        permuted = score(kind, weight[:, perm], hessian=hessian[perm][:, perm])
        assert torch.allclose(permuted, score(kind, weight, hessian=hessian)[:, perm], rtol=1e-4), kind


def test_wanda_energy_masks_like_wanda_and_its_pruned_sum_is_the_diagonal_output_error():
    """Same N:M mask as Wanda, but what a solver keeps of it is what the mask leaves of the output energy:
    with decorrelated inputs (X^T X diagonal) the pruned sum is exactly ||X (W - W_pruned)^T||^2."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 16, generator=generator)
    inputs = torch.linalg.qr(torch.randn(64, 16, generator=generator))[0] * torch.rand(16, generator=generator)
    act_sq = inputs.square().sum(0)
    energy = score("wanda_energy", weight, act_sq=act_sq)
    mask = nm_mask(energy, 2, 4)
    assert torch.equal(mask, nm_mask(score("wanda", weight, act_sq=act_sq), 2, 4))
    error = (inputs @ (weight * ~mask).T).square().sum()
    assert torch.allclose(energy[~mask].sum(), error, rtol=1e-4)


def test_score_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown score kind"):
        score("obs", torch.ones(2, 4))
    with pytest.raises(ValueError, match="needs input statistics"):
        score("wanda", torch.ones(2, 4))


def test_consumer_rejects_bad_statistics():
    with pytest.raises(ValueError, match="NaN or inf"):
        Consumer(torch.ones(2, 4), act_sq=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        Consumer(torch.ones(2, 4), hessian=torch.full((4, 4), float("inf")))
    with pytest.raises(ValueError, match="does not match"):
        Consumer(torch.ones(2, 4), hessian=torch.eye(5))
    with pytest.raises(ValueError, match="does not match"):
        Consumer(torch.ones(2, 4), act_sq=torch.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        Consumer(torch.ones(4))


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_even_with_ties(n, m):
    mask = nm_mask(torch.ones(3, 2 * m), n, m)
    assert (mask.reshape(3, 2, m).sum(-1) == n).all()


def test_nm_mask_breaks_ties_deterministically_by_position():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 2.0, 2.0, 2.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]
    assert torch.equal(nm_mask(scores.repeat(64, 1), 2, 4), nm_mask(scores, 2, 4).repeat(64, 1))


@pytest.mark.parametrize("cols", [8, 12, 13])
def test_packed_bits_are_an_eighth_of_the_mask_and_unpack_to_it(cols):
    bits = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (cols + 7) // 8)
    assert torch.equal(unpack_bits(packed, cols), bits)
    assert int(pack_bits(torch.eye(8, dtype=torch.bool))[3]) == 1 << 3  # bit j of a byte is column 8k + j
