"""Folding a permutation into the weights, so the model computes exactly what it did before.

`perm[j]` is the old channel placed at new position j: producers get `W[perm, :]` (rows and
biases; an Embedding's columns), consumers `W[:, perm]`, norms `w[perm]`. The activation between
them arrives permuted and is read in the same permuted order, so outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping

import torch

from learned_permutation.math.permutations import check_permutation
from learned_permutation.structure.offload import read_parameter, storage_key, stored_tensor, write_parameter
from learned_permutation.structure.sites import PermutationSite


def validate_permutation(site: PermutationSite, perm: torch.Tensor) -> torch.Tensor:
    """`perm` as a LongTensor, or a ValueError naming the site and why it cannot be folded there."""
    perm = torch.as_tensor(perm)
    try:
        check_permutation(perm, site.size, site.block_size)
    except ValueError as error:
        raise ValueError(f"site {site.name} ({site.kind}): {error}") from error
    return perm.long()


@torch.no_grad()
def fold_permutation(model: torch.nn.Module, site: PermutationSite, perm: torch.Tensor) -> None:
    """Permute `site`'s channels by `perm` in place, keeping `model`'s outputs unchanged."""
    fold_permutations(model, {site: perm})


@torch.no_grad()
def fold_permutations(model: torch.nn.Module, perms: Mapping[PermutationSite, torch.Tensor]) -> None:
    """Fold every site's permutation, as folding them one after another would, each parameter read and
    written once: a weight touched by two sites (``down_proj``: the residual's rows, the MLP's columns)
    crosses to the execution device and back once on an offloaded model, not once per site.

    Every permutation is checked before anything is written. Works on offloaded models: every write goes
    through `update_offload_parameter`. A parameter shared by several modules (tied embeddings) is
    permuted once per site.
    """
    moves: dict[Hashable, tuple[torch.nn.Module, str, list[tuple[int, torch.Tensor]]]] = {}
    for site, perm in perms.items():
        _check_site_belongs_to(model, site)
        in_site: set[Hashable] = set()
        for module, name, dim, index in _site_moves(site, validate_permutation(site, perm)):
            if stored_tensor(module, name) is None:
                continue
            key = storage_key(module, name)
            if key not in in_site:
                in_site.add(key)
                moves.setdefault(key, (module, name, []))[2].append((dim, index))
    for module, name, steps in moves.values():
        value = read_parameter(module, name)
        for dim, index in steps:
            value = value.index_select(dim, index.to(value.device))
        write_parameter(module, name, value)


def _site_moves(site: PermutationSite, perm: torch.Tensor) -> Iterator[tuple[torch.nn.Module, str, int, torch.Tensor]]:
    """(module, parameter, dimension, index) of every permutation the site's folding applies."""
    for named in site.producers:
        if isinstance(named.module, torch.nn.Embedding):
            yield named.module, "weight", 1, perm
        else:
            yield named.module, "weight", 0, perm
            yield named.module, "bias", 0, perm
    for named in site.norms:
        yield named.module, "weight", 0, perm
        yield named.module, "bias", 0, perm
    consumer_index = site.consumer_column_index(perm)
    for named in site.consumer_modules:
        yield named.module, "weight", 1, consumer_index


def _check_site_belongs_to(model: torch.nn.Module, site: PermutationSite) -> None:
    named = site.producers[0]
    if model.get_submodule(named.name) is not named.module:
        raise ValueError(f"site {site.name} was found on a different model; call find_sites on this model")
