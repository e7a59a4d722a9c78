"""Target resolution as the pruner resolves it, reproducibility of the Python route, and the inputs
refused at initialisation, before the first calibration forward pass (issue 13); real ``oneshot``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import Dataset
from loguru import logger
from safetensors.torch import load_file
from test_modifier import NUM_SAMPLES, SEQ_LEN, assert_exact_nm, calibration_dataset, logits, run_oneshot
from tiny_models import TINY_SHAPE, random_model, save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from learned_permutation import REPORT_FILE, LearnedPermutationModifier
from learned_permutation.plugin.recipe_checks import MIN_CALIBRATION_TOKENS, pruned_modules
from learned_permutation.tools.llama2c import EMBEDDED_MODEL_DIR
from llmcompressor import oneshot
from llmcompressor.core import State
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

CONTAINERS = [r"re:model.layers.\d*$"]  # llm-compressor's own 2:4 examples: whole decoder layers


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def pruners_own_modules(model, pruner) -> dict[torch.nn.Module, str]:
    """The modules ``pruner`` hooks for calibration, computed by its own on_initialize/on_calibration_start."""
    state = State(model=model)
    pruner.on_initialize(state)
    pruner.on_calibration_start(state, None)
    pruner.remove_hooks()
    return dict(pruner._module_names)


@pytest.mark.parametrize(
    "targets, ignore",
    [
        (["Linear"], ["re:.*lm_head"]),
        (["Linear"], ["lm_head"]),  # llm-compressor 0.14 matches "lm_head." here: the head is pruned
        (CONTAINERS, ["re:.*lm_head"]),
        (CONTAINERS, ["re:.*down_proj"]),
        (["LlamaDecoderLayer", "lm_head"], ["re:.*self_attn.*"]),
    ],
)
def test_targets_resolve_to_exactly_the_pruners_modules(llama_dir, targets, ignore):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    pruner = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=targets, ignore=ignore)
    own = pruners_own_modules(model, pruner)
    ours = pruned_modules(model, targets, ignore)
    assert own and {module: name for name, module in ours.items()} == own


def permuted_and_pruned(model_dir, targets, output_dir, **oneshot_args):
    recipe = [
        LearnedPermutationModifier(mask_structure="2:4", method="greedy"),
        WandaPruningModifier(sparsity=0.5, mask_structure="2:4", targets=targets, ignore=["re:.*lm_head"]),
    ]
    model = run_counting_forwards(model_dir, recipe, output_dir=str(output_dir), **oneshot_args)
    return model, json.loads((output_dir / REPORT_FILE).read_text())


@pytest.mark.parametrize("pipeline", ["independent", "sequential"])
def test_container_targets_permute_like_linear_targets(llama_dir, tmp_path, pipeline):
    """llm-compressor's container idiom (whole decoder layers) must not be a silent no-op: every site
    is permuted for the Linears the pruner prunes, with the same result as ``targets: ["Linear"]``."""
    linear_model, linear_report = permuted_and_pruned(llama_dir, ["Linear"], tmp_path / "linear", pipeline=pipeline)
    container_model, container_report = permuted_and_pruned(
        llama_dir, CONTAINERS, tmp_path / "containers", pipeline=pipeline,
        sequential_targets=["LlamaDecoderLayer"] if pipeline == "sequential" else None,
    )
    pruned = set(pruned_modules(container_model, CONTAINERS, ["re:.*lm_head"]).values())
    for site in container_report["sites"]:
        assert site["consumers"], site["site"]
        assert all(container_model.get_submodule(name) in pruned for name in site["consumers"])
    expected_sites = 1 + 2 * container_model.config.num_hidden_layers
    assert len(container_report["sites"]) == expected_sites
    assert [s["consumers"] for s in container_report["sites"]] == [s["consumers"] for s in linear_report["sites"]]
    assert_exact_nm(container_model, 2, 4)
    linear_weights, container_weights = linear_model.state_dict(), container_model.state_dict()
    for key, value in linear_weights.items():
        assert torch.equal(value, container_weights[key]), key


def test_no_targeted_consumer_is_an_error(llama_dir):
    recipe = [
        LearnedPermutationModifier(mask_structure="2:4", method="greedy"),
        WandaPruningModifier(sparsity=0.5, mask_structure="2:4", targets=CONTAINERS, ignore=["re:.*_proj$"]),
    ]
    with pytest.raises(ValueError, match="nothing to permute for"):
        run_counting_forwards(llama_dir, recipe)


def test_python_route_twice_saves_bit_identical_checkpoints(llama_dir, tmp_path):
    """The README's Python route (``shuffle_calibration_samples=False``) run twice gives the same checkpoint,
    here with 8 of 16 rows calibrating; with llm-compressor's default unseeded shuffle it would not."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    dataset = calibration_dataset(tokenizer, num_samples=2 * NUM_SAMPLES)
    saved = []
    for run in range(2):
        output_dir = tmp_path / f"run{run}"
        oneshot(
            model=AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32),
            tokenizer=tokenizer,
            recipe=[
                LearnedPermutationModifier(mask_structure="2:4", method="greedy"),
                SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=CONTAINERS, ignore=["re:.*lm_head"]),
            ],
            dataset=dataset,
            num_calibration_samples=NUM_SAMPLES,
            max_seq_length=SEQ_LEN,
            shuffle_calibration_samples=False,
            output_dir=str(output_dir),
        )
        saved.append(load_file(output_dir / "model.safetensors"))
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[1][key]), key


def test_unseeded_calibration_shuffle_is_warned_about(llama_dir):
    messages = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        run_counting_forwards(llama_dir, [LearnedPermutationModifier(mask_structure="2:4", method="identity")])
        assert not any("shuffle_calibration_samples=False" in m for m in messages)
        run_counting_forwards(llama_dir, [LearnedPermutationModifier(mask_structure="2:4", method="identity")],
                              shuffle_calibration_samples=True)
    finally:
        logger.remove(sink)
    assert any("shuffle_calibration_samples=False" in m for m in messages)


# ---------------------------------------------------------------------- refused before any forward pass


def run_counting_forwards(model_dir, recipe, dataset=None, dtype=torch.float32, **oneshot_args):
    """``oneshot`` on 8 x 32 random tokens (unshuffled), with a forward pre-hook on the model that counts calibration
    forwards in ``run_counting_forwards.calls`` (tests of refused inputs assert it stayed 0)."""
    calls = []
    oneshot_args.setdefault("shuffle_calibration_samples", False)
    oneshot_args.setdefault("output_dir", None)
    try:
        return run_oneshot(model_dir, recipe, dataset=dataset, dtype=dtype,
                           on_model=lambda model: model.register_forward_pre_hook(lambda *_: calls.append(1)),
                           **oneshot_args)
    finally:
        run_counting_forwards.calls = len(calls)


def assert_refused_before_forward(model_dir, recipe, match, dataset=None):
    with pytest.raises(ValueError, match=match):
        run_counting_forwards(model_dir, recipe, dataset)
    assert run_counting_forwards.calls == 0, "a calibration forward pass ran before the error"


def wanda(mask="2:4"):
    return WandaPruningModifier(sparsity=0.5, mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"])


def test_misordered_recipe_fails_before_forward(llama_dir):
    recipe = [wanda(), LearnedPermutationModifier(mask_structure="2:4")]
    assert_refused_before_forward(llama_dir, recipe, "placed after WandaPruningModifier")


def test_mask_structure_mismatch_fails_before_forward(llama_dir):
    recipe = [LearnedPermutationModifier(mask_structure="2:4"), wanda("4:8")]
    assert_refused_before_forward(llama_dir, recipe, "mask_structure mismatch")


def test_non_divisible_site_fails_before_forward(tmp_path):
    model_dir = tmp_path / "odd"
    random_model(LlamaConfig(**{**TINY_SHAPE, "intermediate_size": 130})).save_pretrained(model_dir)
    copy_tokenizer(model_dir)
    recipe = [LearnedPermutationModifier(mask_structure="2:4"), wanda()]
    assert_refused_before_forward(model_dir, recipe, r"mlp \(mlp\) has 130 channels, not a multiple of M=4")


def test_nan_weight_is_named_before_forward(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    copy_tokenizer(tmp_path / "nan")
    recipe = [LearnedPermutationModifier(mask_structure="2:4"), wanda()]
    assert_refused_before_forward(tmp_path / "nan", recipe, r"weight model\.layers\.1\.mlp\.up_proj\.weight contains NaN")


@pytest.mark.parametrize("texts", [[""], ["a b"] * 3])
def test_too_little_calibration_text_fails_before_forward(llama_dir, texts):
    recipe = [LearnedPermutationModifier(mask_structure="2:4"), wanda()]
    assert_refused_before_forward(
        llama_dir, recipe, f"fewer than the {MIN_CALIBRATION_TOKENS}", dataset=Dataset.from_dict({"text": texts})
    )


@pytest.mark.parametrize("arguments", ["method: greedy\n      solver_args: {sweepz: 3}",
                                       "solver_args: {greedy: {sweepz: 3}}"])
def test_unknown_solver_args_fail_at_recipe_parsing_with_the_valid_keys(llama_dir, tmp_path, arguments):
    recipe = modifier_recipe_file(tmp_path, arguments)
    assert_refused_before_forward(llama_dir, recipe, r"solver_args \['sweepz'\].*valid keys: \[.*'sweeps'")


@pytest.mark.parametrize("candidate", ["ria@wandda", "riа", "ria+@wanda", "ria@"])
def test_a_misspelt_candidate_fails_at_recipe_parsing_with_the_grammar(llama_dir, tmp_path, candidate):
    recipe = modifier_recipe_file(tmp_path, f"candidates: [identity, '{candidate}']")
    assert_refused_before_forward(llama_dir, recipe, r"solver\[\+solver...\]\[@score\].*'ria@wanda'")


def test_scoring_more_tokens_than_the_sample_fails_at_recipe_parsing(llama_dir, tmp_path):
    recipe = modifier_recipe_file(tmp_path, "sample_tokens: 1024\n      scoring_tokens: 4096")
    assert_refused_before_forward(llama_dir, recipe, "scoring_tokens=4096 exceeds sample_tokens=1024.*raise sample_tokens")
    assert LearnedPermutationModifier(sample_tokens=1024)._scoring_tokens() == 1024  # the default follows it


def modifier_recipe_file(directory, arguments: str) -> str:
    """A YAML recipe of the modifier alone (2:4) with ``arguments`` (YAML lines at the field indent)."""
    recipe = directory / "recipe.yaml"
    recipe.write_text(
        "sparsity_stage:\n  sparsity_modifiers:\n    LearnedPermutationModifier:\n      mask_structure: '2:4'\n"
        f"      {arguments}\n"
    )
    return str(recipe)


def test_solver_seed_is_the_modifiers_own_field():
    with pytest.raises(ValueError, match="modifier's own `seed`"):
        LearnedPermutationModifier(method="greedy", solver_args={"seed": 1})


def copy_tokenizer(model_dir):
    for path in EMBEDDED_MODEL_DIR.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, model_dir / path.name)


def test_bfloat16_end_to_end(llama_dir):
    """bf16 through the modifier: the permutation alone keeps the bf16 model's function within bf16
    rounding, and with the pruner every pruned Linear is exactly 2:4, saved in bf16."""
    dense = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    permuted = run_counting_forwards(llama_dir, [LearnedPermutationModifier(mask_structure="2:4")], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in permuted.parameters())
    reference, result = logits(dense).float(), logits(permuted).float()
    assert (result - reference).abs().max() <= 0.02 * reference.abs().max()
    assert not all(torch.equal(a, b) for a, b in zip(dense.parameters(), permuted.parameters()))
    pruned = run_counting_forwards(llama_dir, [LearnedPermutationModifier(mask_structure="2:4"), wanda()],
                                   dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in pruned.parameters())
    assert_exact_nm(pruned, 2, 4)
