"""``objective: model``: permutations trained through the pruned model on its own loss."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from loguru import logger
from test_modifier import logits, run_oneshot, weights
from test_selection import batches, input_energy, targeted_linears, wanda_prune_in_storage_order

from learned_permutation.math.permutations import check_permutation
from learned_permutation.plugin.end_to_end import EndToEndArgs, EndToEndLearning, split_sample
from learned_permutation.plugin.pruner_model import PrunerModel
from learned_permutation.plugin.selection import calibration_sample, prediction_losses
from learned_permutation.structure import find_sites, fold_permutation
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from learned_permutation import REPORT_FILE, LearnedPermutationModifier, fold_saved_permutations
from learned_permutation.tools.llama2c import EMBEDDED_MODEL_DIR
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

N, M = 2, 4
WANDA = PrunerModel("wanda", N, M)


def learner(model, data, kinds, **knobs) -> EndToEndLearning:
    sites = find_sites(model, M, kinds=kinds)
    args = EndToEndArgs(sites=list(kinds), train_tokens=64, batch_tokens=64, held_out_tokens=64, **knobs)
    return EndToEndLearning(model, sites, targeted_linears(model), input_energy(model, data), WANDA, args, "cpu")


def outlier_model():
    """A tiny Llama whose first 16 residual channels are 8x larger at every reader's input, so the
    identity order packs them four to a group and 2:4 must drop half of them."""
    model = build_tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:16] *= 8
            layer.post_attention_layernorm.weight[:16] *= 8
    return model


def sample(model, rows=8, width=24, seed=0) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (rows, width), generator=torch.Generator().manual_seed(seed))
    return calibration_sample([{"input_ids": ids}], rows * width)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_simulated_hard_permutation_is_what_the_folded_pruned_model_computes(kind):
    """The CE the learner reports for hard orders is the loss of the model with those orders folded and
    Wanda's mask applied in storage order (GQA attn_vo, biases, every site kind at once)."""
    model = build_tiny_model(kind)
    data = batches(model.config.vocab_size)
    kinds = ("residual", "mlp", "attn_vo")
    learning = learner(model, data, kinds, kl=0.0)
    generator = torch.Generator().manual_seed(5)
    orders = {}
    for site in learning.sites:
        block = learning.args.block_for(site)
        local = torch.rand(site.size // block, block, generator=generator).argsort(dim=1)
        orders[site.name] = (local + torch.arange(site.size // block)[:, None] * block).flatten()
    batch = {"input_ids": data[0]["input_ids"], "attention_mask": data[0]["attention_mask"]}
    simulated = learning.loss(batch, learning._dense_targets(batch), orders)["ce"]

    folded = copy.deepcopy(model)
    for site in find_sites(folded, M, kinds=kinds):
        fold_permutation(folded, site, orders[site.name])
    wanda_prune_in_storage_order(folded, input_energy(folded, data))
    assert simulated == pytest.approx(prediction_losses(folded, batch)["ce"], rel=1e-4)
    assert "forward" not in model.model.layers[0].__dict__  # the patched forwards are gone
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_learning_beats_its_start_on_held_out_tokens_and_the_gradient_is_what_does_it():
    """Residual only, from a start that packs the outlier channels into the same 2:4 groups: the learned hard permutation
    has a lower held-out loss than the start; with a learning rate too small to move any logit past
    the start's margin, nothing changes (the improvement is the gradient's)."""
    model = outlier_model()
    train, held_out = split_sample(sample(model, rows=10), held_out_tokens=48, batch_tokens=200)
    data = train + [held_out]
    learning = learner(model, data, ("residual",), steps=30, lr=0.1, checks=3)
    perms, report = learning.run(train, held_out)
    check_permutation(perms["residual"], model.config.hidden_size)
    assert report["chosen"] != "start"
    assert report["held_out_losses"][report["chosen"]] < report["held_out_losses"]["start"]
    assert report["moved_channels"]["residual"] > 0
    assert len(report["train_losses"]) == 30

    frozen = learner(model, data, ("residual",), steps=30, lr=1e-6, checks=3)
    still, report = frozen.run(train, held_out)
    assert torch.equal(still["residual"], torch.arange(model.config.hidden_size))


def test_learned_permutations_are_valid_and_stay_in_their_blocks():
    model = build_tiny_model("qwen3")
    train, held_out = split_sample(sample(model), held_out_tokens=48, batch_tokens=100)
    learning = learner(model, train + [held_out], ("residual", "mlp", "attn_vo"), steps=4, lr=0.5, checks=1, block=16)
    perms, _ = learning.run(train, held_out)
    for site in learning.sites:
        check_permutation(perms[site.name], site.size, learning.args.block_for(site))


def test_random_search_never_keeps_a_worse_order_on_its_batches():
    model = build_tiny_model("llama")
    train, held_out = split_sample(sample(model), held_out_tokens=48, batch_tokens=500)
    learning = learner(model, train + [held_out], ("residual",), steps=6, search="random", checks=1)
    perms, report = learning.run(train, held_out)
    check_permutation(perms["residual"], model.config.hidden_size)
    assert report["train_losses"] == sorted(report["train_losses"], reverse=True)


def test_split_sample_keeps_held_out_rows_apart_and_batches_bounded():
    model = build_tiny_model("llama")
    whole = sample(model, rows=8, width=24)
    train, held_out = split_sample(whole, held_out_tokens=40, batch_tokens=50)
    assert int(held_out["attention_mask"].sum()) >= 40
    assert all(int(batch["attention_mask"].sum()) <= 50 for batch in train)
    rows = [tuple(r.tolist()) for batch in train for r in batch["input_ids"]]
    assert not set(rows) & {tuple(r.tolist()) for r in held_out["input_ids"]}
    assert len(rows) + len(held_out["input_ids"]) == 8
    with pytest.raises(ValueError, match="too few to keep"):
        split_sample(whole, held_out_tokens=24 * 8, batch_tokens=50)


@pytest.mark.parametrize("knobs, message", [
    ({"steps": 0}, "greater than or equal to 1"),
    ({"temperature": (0.1, 1.0)}, "start >= end > 0"),
    ({"ce": 0.0, "kl": 0.0}, "all 0"),
    ({"batch_tokens": 8192, "train_tokens": 1024}, "exceeds train_tokens"),
    ({"sites": []}, "at least one site"),
    ({"stpes": 10}, "Extra inputs are not permitted"),
])
def test_budget_knobs_are_validated(knobs, message):
    with pytest.raises(ValueError, match=message):
        EndToEndArgs(**knobs)


@pytest.fixture(scope="module")
def outlier_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("outliers")
    outlier_model().save_pretrained(directory)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR).save_pretrained(directory)
    return directory


E2E_BUDGET = dict(steps=12, lr=0.2, train_tokens=192, batch_tokens=96, held_out_tokens=64, checks=2)


def test_objective_model_folds_the_learned_order_on_top_and_saves_the_composition(outlier_dir, tmp_path):
    """Permutation only (no pruner), from the identity: the model still computes what the dense one
    did, the end-to-end stage moved channels, and the saved permutations (their composition) put the
    dense model exactly in the checkpoint's order."""
    modifier = LearnedPermutationModifier(mask_structure="2:4", candidates=["identity"], objective="model",
                                          end_to_end=E2E_BUDGET)
    permuted = run_oneshot(outlier_dir, modifier, output_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())["end_to_end"]
    assert report["sites"] == ["residual"] and report["moved_channels"]["residual"] > 0
    assert report["held_out_losses"][report["chosen"]] < report["held_out_losses"]["start"]

    dense = AutoModelForCausalLM.from_pretrained(outlier_dir, dtype=torch.float32)
    assert (logits(permuted) - logits(dense)).abs().max() <= 1e-4 * logits(dense).abs().max()
    fold_saved_permutations(dense, tmp_path / "out")
    assert all(torch.equal(value, weights(permuted)[key]) for key, value in weights(dense).items())


@pytest.mark.parametrize("fields, message", [
    ({"end_to_end": {"steps": 5}}, "objective is 'layer'"),
    ({"objective": "model", "sites": ["mlp"]}, r"\['residual'\] are not among"),
    ({"objective": "model", "end_to_end": {"block": 6}}, "multiple of M=4 that divides"),
    ({"objective": "model", "end_to_end": {"held_out_tokens": 4096, "train_tokens": 4096}}, "holds 256"),
])
def test_end_to_end_fields_are_checked_before_calibration(outlier_dir, fields, message):
    with pytest.raises(ValueError, match=message):
        run_oneshot(outlier_dir, LearnedPermutationModifier(mask_structure="2:4", **fields))


def test_objective_model_with_sparsegpt_is_warned_about_before_calibration(outlier_dir):
    """It trains against SparseGPT's mask but not its weight update (worse on SmolLM2): said at
    initialisation (here the run is then refused for its budget, before any forward)."""
    messages = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        for pruner in (WandaPruningModifier, SparseGPTModifier):
            with pytest.raises(ValueError, match="holds 256"):
                run_oneshot(outlier_dir, [
                    LearnedPermutationModifier(mask_structure="2:4", objective="model",
                                               end_to_end={"held_out_tokens": 4096, "train_tokens": 4096}),
                    pruner(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["lm_head"])])
            assert any("without its weight update" in m for m in messages) == (pruner is SparseGPTModifier)
    finally:
        logger.remove(sink)
