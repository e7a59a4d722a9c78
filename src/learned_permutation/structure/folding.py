"""Folding a permutation into the weights, so the model computes exactly what it did before.

`perm[j]` is the old channel placed at new position j: producers get `W[perm, :]` (rows and
biases; an Embedding's columns), consumers `W[:, perm]`, norms `w[perm]`. The activation between
them arrives permuted and is read in the same permuted order, so outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from learned_permutation.math.permutations import check_permutation
from learned_permutation.structure.offload import permute_parameter, storage_key, stored_tensor
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
    """Permute `site`'s channels by `perm` in place, keeping `model`'s outputs unchanged.

    Works on offloaded models: every write goes through `update_offload_parameter`. A
    parameter shared by several modules (tied embeddings) is permuted once.
    """
    _check_site_belongs_to(model, site)
    perm = validate_permutation(site, perm)
    consumer_index = site.consumer_column_index(perm)
    permuted: set[Hashable] = set()

    def permute(module: torch.nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
        if stored_tensor(module, name) is None:
            return
        key = storage_key(module, name)
        if key not in permuted:
            permute_parameter(module, name, dim, index)
            permuted.add(key)

    for named in site.producers:
        if isinstance(named.module, torch.nn.Embedding):
            permute(named.module, "weight", 1, perm)
        else:
            permute(named.module, "weight", 0, perm)
            permute(named.module, "bias", 0, perm)
    for named in site.norms:
        permute(named.module, "weight", 0, perm)
        permute(named.module, "bias", 0, perm)
    for named in site.consumer_modules:
        permute(named.module, "weight", 1, consumer_index)


def _check_site_belongs_to(model: torch.nn.Module, site: PermutationSite) -> None:
    named = site.producers[0]
    if model.get_submodule(named.name) is not named.module:
        raise ValueError(f"site {site.name} was found on a different model; call find_sites on this model")
