"""The default method's layer pass: the statistics each pruner needs, one prepared problem per site, a bounded residual sample."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from learned_permutation import REPORT_FILE, LearnedPermutationModifier, fold_saved_permutations
from learned_permutation.plugin.pruner_model import PrunerModel
from learned_permutation.plugin.statistics import InputStatistics
from learned_permutation.plugin.residual_sample import ReaderRowSample
from learned_permutation.structure import find_sites
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from test_modifier import calibration_dataset, run_oneshot
from tiny_models import TINY_SHAPE, build_tiny_model, random_model, save_tiny_model
from transformers import AutoTokenizer, LlamaConfig

from learned_permutation.tools.llama2c import EMBEDDED_MODEL_DIR


def test_reader_sample_holds_about_one_layer_of_readers():
    model = build_tiny_model("llama")
    residual = find_sites(model, 4, kinds=("residual",))[0]
    readers = [named.module for named in residual.consumer_modules if "lm_head" not in named.name]
    layers = model.config.num_hidden_layers
    total = sum(m.out_features for m in readers)
    sample = ReaderRowSample(layers, total, seed=0)
    for module in readers:
        sample.add(module.weight, torch.ones(module.in_features))
    assert total / layers - len(readers) <= sample.sampled_rows <= total / layers + len(readers)  # rounding
    assert all(consumer.weight.shape[1] == model.config.hidden_size for consumer in sample.consumers)


def test_reader_sample_rows_are_bounded_whatever_the_width():
    """Llama-3.2-1B's readers (19,456 rows per layer): a layer's share of them would be 76 MiB in fp32."""
    hidden, rows_per_layer, layers = 64, [2048, 512, 512, 8192, 8192], 2
    sample = ReaderRowSample(layers, layers * sum(rows_per_layer), seed=0, max_rows=1024)
    for rows in rows_per_layer * layers:
        sample.add(torch.randn(rows, hidden), torch.ones(hidden))
    assert 1024 - len(rows_per_layer) * layers <= sample.sampled_rows <= 1024 + len(rows_per_layer) * layers


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


def test_select_samples_about_one_layer_of_residual_readers(deep_llama_dir, tmp_path):
    """The residual solve saw about one layer's rows of readers, not all of them."""
    recipe = [
        LearnedPermutationModifier(mask_structure="2:4", sites=["residual", "mlp"]),
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"]),
    ]
    out = tmp_path / "out"
    run_oneshot(deep_llama_dir, recipe, output_dir=out)
    report = json.loads((out / REPORT_FILE).read_text())
    residual = next(s for s in report["sites"] if s["kind"] == "residual")
    config = AutoModelForCausalLM.from_pretrained(deep_llama_dir).config
    kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    one_layer = config.hidden_size + 2 * kv + 2 * config.intermediate_size
    assert residual["sampled_rows"] <= one_layer + 5 < config.num_hidden_layers * one_layer


@pytest.mark.parametrize("pruner, full_hessians", [("wanda", False), ("sparsegpt", True)])
def test_layer_pass_gathers_hessians_only_for_a_score_that_reads_them(llama_dir, tmp_path, monkeypatch, pruner, full_hessians):
    """Wanda's score reads only input energies, so no per-layer Hessian is accumulated (an 8192-input
    down_proj's costs 256 MiB and a 8192^3 product per batch); SparseGPT's saliency reads the inverse
    Hessian, so its per-layer sites get theirs, and its objectives are the full-Hessian ones."""
    kinds = []
    original = InputStatistics.accumulate

    def recording(self, module, inputs):
        kinds.append(self.full)
        return original(self, module, inputs)

    monkeypatch.setattr(InputStatistics, "accumulate", recording)
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[pruner]
    recipe = [LearnedPermutationModifier(mask_structure="2:4", sites=["mlp"]),
              modifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])]
    run_oneshot(llama_dir, recipe, output_dir=tmp_path / "out")
    assert (True in kinds) == full_hessians and False in kinds
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["score"] == pruner and report["sites"]
    assert all("candidate_pruned_errors" not in site for site in report["sites"])


def test_solvers_and_objectives_of_a_site_share_one_prepared_problem(llama_dir, tmp_path, monkeypatch):
    """With SparseGPT each consumer's damped Hessian is inverted once per site, not once per solver
    and objective (three solvers and three objectives here)."""
    from learned_permutation.math import scores

    inversions = []
    original = scores.inverse_hessian_diagonal

    def counting(channels, act_sq, hessian):
        inversions.append(hessian is not None)
        return original(channels, act_sq, hessian)

    monkeypatch.setattr(scores, "inverse_hessian_diagonal", counting)
    recipe = [LearnedPermutationModifier(mask_structure="2:4", sites=["mlp"]),
              SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])]
    run_oneshot(llama_dir, recipe, output_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert inversions.count(True) == sum(len(site["consumers"]) for site in report["sites"])


def test_greedy_candidate_is_the_greedy_methods_permutation():
    """Under select the greedy candidate swaps from the stored order (its own configuration, not a
    refinement of ria's) with the solver's own knobs (three sweeps), at every site: the configuration
    select compares is the greedy method's, not a cheaper stand-in."""
    from learned_permutation.math import solve_permutation
    from learned_permutation.math.objectives import Consumer
    from learned_permutation.plugin.search import PermutationSearch, SearchSettings

    model = build_tiny_model("llama")
    sites = find_sites(model, 4)
    modifier = LearnedPermutationModifier(mask_structure="2:4")
    settings = SearchSettings(candidates=("identity", "ria", "greedy"), pruner=PrunerModel("wanda", 2, 4),
                              solver_args=modifier._candidate_solver_args())
    search = PermutationSearch(model, sites, [], lambda site: [], settings, None, {})
    generator = torch.Generator().manual_seed(0)
    problem = dict(n=2, m=4, score_kind="wanda")
    mlp = next(s for s in sites if s.kind == "mlp")
    for site, channels in ((sites[0], 1024), (mlp, mlp.size)):  # 1,024 channels: four greedy windows
        consumers = [Consumer(weight=torch.randn(600, channels, generator=generator),
                              act_sq=torch.rand(channels, generator=generator) + 0.1)]
        found = search._solve(site, consumers)[0]["greedy"]
        assert torch.equal(found, solve_permutation(consumers, method="greedy", **problem, block_size=site.block_size)), site.kind
        if channels == 1024:  # where sweeps can differ, one sweep finds another order
            assert not torch.equal(found, solve_permutation(consumers, method="greedy", **problem, sweeps=1))


def test_a_candidate_with_its_own_score_is_its_solver_on_that_score():
    """``ria@wanda`` under SparseGPT is the ria solver on the Wanda score (another permutation than ria on
    SparseGPT's saliency), while the layer-wise objectives still read the pruner's score."""
    from learned_permutation.math import solve_permutation
    from learned_permutation.math.objectives import Consumer
    from learned_permutation.plugin.search import PermutationSearch, SearchSettings

    model = build_tiny_model("llama")
    mlp = next(s for s in find_sites(model, 4) if s.kind == "mlp")
    settings = SearchSettings(candidates=("ria", "ria@wanda", "ria+greedy@wanda"), pruner=PrunerModel("sparsegpt", 2, 4))
    search = PermutationSearch(model, [mlp], [], lambda site: [], settings, None, {})
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(4 * mlp.size, mlp.size, generator=generator) * torch.rand(mlp.size, generator=generator) * 3
    consumers = [Consumer(weight=torch.randn(48, mlp.size, generator=generator), hessian=inputs.T @ inputs)]
    found, problem = search._solve(mlp, consumers)
    assert problem.score_kind == "sparsegpt"
    for name, score, knobs in (("ria", "sparsegpt", {}), ("ria@wanda", "wanda", {})):
        assert torch.equal(found[name], solve_permutation(consumers, 2, 4, score, "ria", **knobs)), name
    assert torch.equal(found["ria+greedy@wanda"], solve_permutation(
        consumers, 2, 4, "wanda", "greedy", init=found["ria@wanda"]))
    assert not torch.equal(found["ria"], found["ria@wanda"])


def test_fisher_weighting_feeds_every_residual_reader_its_rows_sensitivity(llama_dir, tmp_path, monkeypatch):
    """With ``residual_weighting: fisher`` each reader's rows reach the residual sample with one sensitivity
    per row, from the sweep the report times; with the default, none."""
    calls = {}
    original = ReaderRowSample.add

    def recording(self, weight, act_sq, sensitivity=None):
        calls[weight.shape] = calls.get(weight.shape, []) + [sensitivity]
        return original(self, weight, act_sq, sensitivity)

    monkeypatch.setattr(ReaderRowSample, "add", recording)
    for weighting in ("fisher", "none"):
        calls.clear()
        recipe = [LearnedPermutationModifier(mask_structure="2:4", sites=["residual"], residual_weighting=weighting),
                  WandaPruningModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])]
        run_oneshot(llama_dir, recipe, output_dir=tmp_path / weighting)
        report = json.loads((tmp_path / weighting / REPORT_FILE).read_text())
        sensitivities = [s for found in calls.values() for s in found]
        assert report["residual_weighting"] == weighting and sensitivities
        if weighting == "fisher":
            assert all(s is not None and s.shape == (shape[0],) and s.sum() > 0
                       for shape, found in calls.items() for s in found)
            assert report["phase_seconds"]["residual sensitivity"] > 0
        else:
            assert all(s is None for s in sensitivities) and "residual sensitivity" not in report["phase_seconds"]
