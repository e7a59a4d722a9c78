"""The default method's decisions: pruner-aware per-layer errors, bounded residual sample."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from learned_permutation import REPORT_FILE, LearnedPermutationModifier, fold_saved_permutations
from learned_permutation.math import nm_mask
from learned_permutation.math import score as pruning_score
from learned_permutation.plugin.pruner_aware import PrunerModel, pruned_output_errors
from learned_permutation.plugin.residual_sample import ReaderRowSample
from learned_permutation.structure import find_sites
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
from test_modifier import calibration_dataset, run_oneshot
from tiny_models import TINY_SHAPE, build_tiny_model, random_model, save_tiny_model
from transformers import AutoTokenizer, LlamaConfig

from learned_permutation.tools.llama2c import EMBEDDED_MODEL_DIR


def random_problem(rows=24, columns=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    inputs = torch.randn(256, columns, generator=generator) * torch.linspace(0.2, 3.0, columns)
    return weight, inputs.T @ inputs


def test_sparsegpt_error_is_sparsegpts_own_result_in_each_candidate_order():
    weight, hessian = random_problem()
    orders = [torch.randperm(32, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    pruner = PrunerModel("sparsegpt", 2, 4, block_size=16, dampening_frac=0.01)
    found = pruned_output_errors(weight, hessian, orders, pruner)
    for columns, error in zip(orders, found):
        module = torch.nn.Linear(32, 24, bias=False)
        module.weight.data = weight[:, columns].clone()
        _, expected = sparsify_weight(module, {module: hessian[columns][:, columns].clone()}, 0.5, 2, 4, 16, 0.01, False)
        delta = weight[:, columns] - expected
        assert error == pytest.approx(float(((delta @ hessian[columns][:, columns]) * delta).sum()), rel=1e-4)
    # the OBS update re-fits the kept weights: less error than the same order's Wanda mask alone
    masked = pruned_output_errors(weight, hessian, orders, PrunerModel("wanda", 2, 4))
    assert all(obs < mask for obs, mask in zip(found, masked))


def test_wanda_error_uses_wandas_mask_in_the_candidate_order():
    weight, hessian = random_problem()
    columns = torch.randperm(32, generator=torch.Generator().manual_seed(2))
    permuted, permuted_hessian = weight[:, columns], hessian[columns][:, columns]
    keep = nm_mask(pruning_score("wanda", permuted, act_sq=permuted_hessian.diagonal()), 2, 4)
    delta = permuted * ~keep
    expected = float(((delta @ permuted_hessian) * delta).sum())
    identity, permuted_error = pruned_output_errors(weight, hessian, [torch.arange(32), columns], PrunerModel("wanda", 2, 4))
    assert permuted_error == pytest.approx(expected, rel=1e-5)
    assert identity != pytest.approx(expected)


def test_reader_sample_holds_about_one_layer_of_readers():
    model = build_tiny_model("llama")
    residual = find_sites(model, 4, kinds=("residual",))[0]
    readers = [named.module for named in residual.consumer_modules if "lm_head" not in named.name]
    layers = model.config.num_hidden_layers
    sample = ReaderRowSample(layers, seed=0)
    for module in readers:
        sample.add(module.weight, torch.ones(module.in_features))
    per_layer = sum(m.out_features for m in readers) / layers
    assert sample.sampled_rows <= per_layer + len(readers)  # at most one rounding row per reader
    assert all(consumer.weight.shape[1] == model.config.hidden_size for consumer in sample.consumers)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def deep_llama_dir(tmp_path_factory):
    """Four layers, so that one layer of readers is a quarter of them all."""
    directory = tmp_path_factory.mktemp("deep")
    random_model(LlamaConfig(**{**TINY_SHAPE, "num_hidden_layers": 4}, tie_word_embeddings=False)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR).save_pretrained(directory)
    return directory


def test_select_reports_sparsegpts_true_error_and_a_bounded_residual_sample(deep_llama_dir, tmp_path):
    """The error reported for the chosen mlp candidate is the output error SparseGPT really left on the
    saved down_proj (computed here from the checkpoint, the folded dense model and the calibration
    inputs); the residual solve saw about one layer's rows of readers, not all of them."""
    recipe = [
        LearnedPermutationModifier(mask_structure="2:4", sites=["residual", "mlp"]),
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"]),
    ]
    out = tmp_path / "out"
    run_oneshot(deep_llama_dir, recipe, output_dir=out)
    report = json.loads((out / REPORT_FILE).read_text())
    site = next(s for s in report["sites"] if s["site"] == "model.layers.0.mlp")
    chosen_error = site["candidate_pruned_errors"][site["chosen_candidate"]]

    dense = AutoModelForCausalLM.from_pretrained(deep_llama_dir, dtype=torch.float32)
    fold_saved_permutations(dense, out)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    down = dense.model.layers[0].mlp.down_proj
    hessian = torch.zeros(down.in_features, down.in_features)

    def gather(_module, args, _output):
        x = args[0].reshape(-1, args[0].shape[-1])
        hessian.add_(x.T @ x)

    handle = down.register_forward_hook(gather)
    data = calibration_dataset(AutoTokenizer.from_pretrained(deep_llama_dir))
    with torch.no_grad():
        dense(input_ids=torch.tensor(data["input_ids"]))
    handle.remove()
    delta = down.weight.detach() - pruned.model.layers[0].mlp.down_proj.weight.detach()
    assert float(((delta @ hessian) * delta).sum()) == pytest.approx(chosen_error, rel=1e-3)

    residual = next(s for s in report["sites"] if s["kind"] == "residual")
    config = dense.config
    kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    one_layer = config.hidden_size + 2 * kv + 2 * config.intermediate_size
    assert residual["sampled_rows"] <= one_layer + 5 < config.num_hidden_layers * one_layer


def test_wanda_select_measures_wandas_error_and_scores_the_lowest_error_mix(llama_dir, tmp_path):
    """Per-layer candidates carry Wanda's mask error; the configuration that takes each site's lowest-error
    candidate is scored with the others (unless it equals one of them)."""
    recipe = [
        LearnedPermutationModifier(mask_structure="2:4", sites=["mlp"]),
        WandaPruningModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"]),
    ]
    run_oneshot(llama_dir, recipe, output_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["score"] == "wanda"
    mix = [min(site["candidate_pruned_errors"], key=site["candidate_pruned_errors"].get) for site in report["sites"]]
    assert all(set(site["candidate_pruned_errors"]) == {"identity", "ria", "greedy"} for site in report["sites"])
    losses = report["configuration_calibration_losses"]
    assert "lowest pruner error" in losses or len(set(mix)) == 1, (mix, losses)


def test_greedy_candidate_starts_from_the_stored_order_with_selects_knobs():
    """Under select the greedy candidate swaps from the stored order (its own configuration, not a
    refinement of ria's), with the cheap knobs, at every site."""
    from learned_permutation.math import solve_permutation
    from learned_permutation.math.objectives import Consumer
    from learned_permutation.plugin.modifier import SELECT_SOLVER_DEFAULTS
    from learned_permutation.plugin.search import PermutationSearch, SearchSettings

    model = build_tiny_model("llama")
    sites = find_sites(model, 4)
    modifier = LearnedPermutationModifier(mask_structure="2:4")
    settings = SearchSettings(candidates=("identity", "ria", "greedy"), pruner=PrunerModel("wanda", 2, 4),
                              solver_args=modifier._candidate_solver_args())
    search = PermutationSearch(model, sites, [], lambda site: [], settings, None, {})
    generator = torch.Generator().manual_seed(0)
    problem = dict(n=2, m=4, score_kind="wanda")
    for site in (sites[0], next(s for s in sites if s.kind == "mlp")):
        consumers = [Consumer(weight=torch.randn(600, site.size, generator=generator),
                              act_sq=torch.rand(site.size, generator=generator) + 0.1)]
        found = search._solve(site, consumers)
        expected = solve_permutation(consumers, method="greedy", **problem, block_size=site.block_size,
                                     **SELECT_SOLVER_DEFAULTS["greedy"])
        assert torch.equal(found["greedy"], expected), site.kind


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_errors_on_a_row_sample_are_the_same_rows_errors_for_every_candidate(score):
    """Rows are pruned independently, so the sampled error is the whole-weight error of those rows."""
    weight, hessian = random_problem(rows=40)
    orders = [torch.arange(32), torch.randperm(32, generator=torch.Generator().manual_seed(4))]
    pruner = PrunerModel(score, 2, 4, block_size=16)
    sampled = pruned_output_errors(weight, hessian, orders, pruner, rows=10)
    chosen = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:10].sort().values
    assert sampled == pytest.approx(pruned_output_errors(weight[chosen], hessian, orders, pruner, rows=None), rel=1e-5)
    whole = pruned_output_errors(weight, hessian, orders, pruner, rows=None)
    assert all(part < total for part, total in zip(sampled, whole))


def test_sparsegpt_candidates_of_a_wide_linear_take_one_obs_pass_each(monkeypatch):
    """When candidates' permuted inverse Hessians exceed OBS_BATCH_BYTES, they are pruned one at a time
    (memory of one inverse, as the pruner's own), with the same errors as the batched pass."""
    from learned_permutation.plugin import pruner_aware

    weight, hessian = random_problem(rows=12)
    orders = [torch.arange(32)] + [torch.randperm(32, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    pruner = PrunerModel("sparsegpt", 2, 4, block_size=16)
    batched = pruned_output_errors(weight, hessian, orders, pruner, rows=None)
    batches = []
    original = pruner_aware.obs_prune_with_inverse

    def recording(permuted, *args):
        batches.append(permuted.shape[0])
        return original(permuted, *args)

    monkeypatch.setattr(pruner_aware, "obs_prune_with_inverse", recording)
    monkeypatch.setattr(pruner_aware, "OBS_BATCH_BYTES", 4 * 32 * 32)
    assert pruned_output_errors(weight, hessian, orders, pruner, rows=None) == pytest.approx(batched, rel=1e-5)
    assert batches == [1, 1, 1]
