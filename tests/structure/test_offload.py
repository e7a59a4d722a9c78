"""Folding offloaded models, as llm-compressor's sequential pipeline offloads them (compressed-tensors caches)."""

from __future__ import annotations

import copy

import pytest
import torch
from compressed_tensors.offload import disable_offloading, offload_module, set_onload_device
from compressed_tensors.offload.cache import OffloadCache
from structure_models import assert_same_logits, build_model, logits_of, random_site_permutation, sample_tokens

from learned_permutation.structure import find_sites, fold_permutation, fold_permutations


def offload(model, offload_device: str, directory) -> None:
    """Offload every module: to CPU as SequentialPipeline does (`set_onload_device`), or to disk files."""
    if offload_device == "cpu":
        set_onload_device(model, torch.device("cpu"))
        return
    for module in model.modules():
        offload_module(module, torch.device("cpu"), "disk", offload_dir=str(directory))


def fold_everything(model, seed=0, at_once=False):
    """A random permutation at every site, folded site by site or all in one call (as the modifier does)."""
    generator = torch.Generator().manual_seed(seed)
    perms = {site: random_site_permutation(site, generator) for site in find_sites(model, 4)}
    if at_once:
        fold_permutations(model, perms)
        return
    for site, perm in perms.items():
        fold_permutation(model, site, perm)


@pytest.mark.parametrize("at_once", [False, True], ids=["site_by_site", "all_sites_at_once"])
@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen3_qk_norm"])
def test_cpu_offloaded_model_like_the_sequential_pipeline(variant, at_once):
    """`set_onload_device` as in SequentialPipeline, folding inside `disable_offloading` as at epoch end."""
    model = build_model(variant)
    reference, permuted_reference = copy.deepcopy(model), copy.deepcopy(model)
    fold_everything(permuted_reference)
    tokens = sample_tokens(model.config.vocab_size)

    offload(model, "cpu", None)
    assert isinstance(model.model.layers[0].mlp.down_proj._parameters, OffloadCache)
    with disable_offloading():
        logits_of(model, tokens)  # onloaded copies are now held, as during calibration
        fold_everything(model, at_once=at_once)
    assert_same_logits(logits_of(reference, tokens), logits_of(model, tokens))
    for name, param in permuted_reference.named_parameters():
        assert torch.equal(model.get_parameter(name), param), name


@pytest.mark.parametrize("variant", ["llama_mha_untied_biases", "llama_gqa_tied"])
def test_disk_offloaded_model_keeps_folded_weights(variant, tmp_path):
    """Disk offloading onloads fresh copies on every access: a write that bypasses the cache is lost.

    Each module gets its own file, so tied embeddings are no longer shared and both are permuted.
    """
    model = build_model(variant)
    reference, permuted_reference = copy.deepcopy(model), copy.deepcopy(model)
    fold_everything(permuted_reference)
    tokens = sample_tokens(model.config.vocab_size)

    offload(model, "disk", tmp_path)
    fold_everything(model, at_once=True)

    assert_same_logits(logits_of(reference, tokens), logits_of(model, tokens))
    for name, param in permuted_reference.named_parameters():
        assert torch.equal(model.get_parameter(name), param), name


@pytest.mark.parametrize("offload_device", ["cpu", "disk"])
def test_consumers_read_offloaded_weights(offload_device, tmp_path):
    model = build_model("llama_gqa_tied")
    plain_sites = find_sites(copy.deepcopy(model), 4)
    offload(model, offload_device, tmp_path)
    consumers = [named for site in plain_sites for named in site.consumer_modules]
    stats = {named.name: torch.rand(named.module.in_features) for named in consumers}

    for plain, offloaded in zip(plain_sites, find_sites(model, 4)):
        expected = plain.consumers_from_stats(stats, device="cpu")
        found = offloaded.consumers_from_stats(stats, device="cpu")
        assert len(found) == len(expected)
        assert all(torch.equal(a.weight, b.weight) and torch.equal(a.act_sq, b.act_sq) for a, b in zip(found, expected))
