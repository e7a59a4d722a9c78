"""Two processes under torchrun (gloo, CPU) against one process on the union of their data
(``examples/distributed_oneshot.py``; ``learned_permutation.plugin.distributed``).

Two launches: the README's command itself (Wanda 2:4 after the modifier) and
``distributed_scenarios.py`` (the other scenarios); the single-process references run here.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_scenarios import NUM_SAMPLES, SEQ_LEN, prune, recipe
from safetensors.torch import load_file

from learned_permutation import PERMUTATIONS_FILE, REPORT_FILE
from learned_permutation.plugin import artifacts
from learned_permutation.plugin.distributed import check_pruner_can_sync
from learned_permutation.plugin.recipe_checks import RecipeCheckError
from llmcompressor.modifiers.pruning import WandaPruningModifier
from tiny_models import build_tiny_model, save_tiny_model

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "distributed_oneshot.py"
WANDA_RECIPE = REPO / "recipes" / "wanda_2of4_permuted.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WORDS = "the cat dog sun moon tree river stone bird fish house road blue red green small big old new runs".split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama and a text file of NUM_SAMPLES paragraphs (file_dataset splits at 2000 characters)."""
    root = tmp_path_factory.mktemp("distributed")
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(450)) for _ in range(NUM_SAMPLES)]
    (root / "data.txt").write_text("\n\n".join(paragraphs))
    return save_tiny_model("llama", root / "llama"), root / "data.txt"


def torchrun(args: list, tmp: Path) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([*TORCHRUN, *map(str, args)], env=environment, cwd=tmp, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def readme_run(inputs, tmp_path_factory) -> Path:
    """The README's command, on two processes."""
    model, data = inputs
    out = tmp_path_factory.mktemp("readme") / "pruned"
    torchrun([EXAMPLE, "--model", model, "--data", data, "--recipe", WANDA_RECIPE, "--output-dir", out,
              "--num-samples", NUM_SAMPLES, "--seq-len", SEQ_LEN], out.parent)
    return out


@pytest.fixture(scope="module")
def scenario_runs(inputs, tmp_path_factory) -> Path:
    model, data = inputs
    out = tmp_path_factory.mktemp("scenarios")
    torchrun([Path(__file__).with_name("distributed_scenarios.py"), model, data, out], out)
    return out


@pytest.fixture(scope="module")
def single_runs(inputs, tmp_path_factory) -> dict[str, Path]:
    """The same script in this one process (no process group): the union of both ranks' rows."""
    model, data = inputs
    out = tmp_path_factory.mktemp("single")
    for name, scenario in {"wanda": WANDA_RECIPE, "sparsegpt": recipe("sparsegpt")}.items():
        prune(model, data, scenario, out / name, NUM_SAMPLES, SEQ_LEN)
    return {"wanda": out / "wanda", "sparsegpt": out / "sparsegpt"}


def checkpoint(directory: Path) -> tuple[dict, dict, dict]:
    report = json.loads((directory / REPORT_FILE).read_text())
    return load_file(directory / PERMUTATIONS_FILE), load_file(directory / "model.safetensors"), report


def pruned_linears(weights: dict) -> list[str]:
    return [name for name in weights if name.endswith("proj.weight")]


@pytest.mark.parametrize("scenario", ["wanda", "sparsegpt", "wanda_cpu_shared"])
def test_two_processes_save_what_one_process_saves_on_the_union(scenario, readme_run, scenario_runs, single_runs):
    """``wanda`` is the README's command; ``wanda_cpu_shared`` a model both ranks read and write in one
    shared CPU copy (folding there is written by rank 0 alone: ``structure/offload.py``), with both
    modifiers in one sequential pipeline."""
    distributed_dir = readme_run if scenario == "wanda" else scenario_runs / scenario
    pruner = scenario.split("_")[0]
    permutations, weights, report = checkpoint(distributed_dir)
    single_permutations, single_weights, single_report = checkpoint(single_runs[pruner])
    assert (report["processes"], report["pruner_statistics_synced"]) == (2, True)
    assert (single_report["processes"], single_report["pruner_statistics_synced"]) == (1, False)
    assert permutations.keys() == single_permutations.keys() and len(permutations) == 5
    assert all(torch.equal(permutations[site], single_permutations[site]) for site in permutations)
    assert weights.keys() == single_weights.keys()
    for name in weights:  # only the order of the additions differs (SparseGPT's inverse amplifies it: 4e-6)
        torch.testing.assert_close(weights[name], single_weights[name], rtol=1e-4, atol=2e-5, msg=name)
    assert all(torch.equal(weights[name] == 0, single_weights[name] == 0) for name in pruned_linears(weights))


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_without_synced_statistics_each_rank_prunes_from_its_half(pruner, scenario_runs, single_runs):
    """The permutations still agree (decided on the union), but the pruner saw half the rows."""
    permutations, weights, report = checkpoint(scenario_runs / f"{pruner}_unsynced")
    single_permutations, single_weights, _ = checkpoint(single_runs[pruner])
    assert (report["processes"], report["pruner_statistics_synced"]) == (2, False)
    assert all(torch.equal(permutations[site], single_permutations[site]) for site in permutations)
    largest = max((weights[name] - single_weights[name]).abs().max().item() for name in pruned_linears(weights))
    assert largest > 1e-2


def test_ranks_that_decide_differently_fail_naming_the_sites(scenario_runs):
    """Rank 1 reverses the residual and mlp solutions; attention (within heads) is left alone."""
    errors = [(scenario_runs / "divergence" / f"error-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1]
    assert "ranks decided different permutations" in errors[0]
    assert "['model.layers.0.mlp', 'model.layers.1.mlp', 'residual']" in errors[0]
    assert not (scenario_runs / "divergence" / "model.safetensors").exists()


def test_statistics_sync_refuses_owl_layer_sparsities_before_calibration():
    """OWL infers each layer's sparsity from the rank's own slice: synced statistics would not make
    the ranks prune alike."""
    owl = WandaPruningModifier(sparsity=0.5, mask_structure="2:4", sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    with pytest.raises(RecipeCheckError, match="OWL"):
        check_pruner_can_sync(owl)
    check_pruner_can_sync(WandaPruningModifier(sparsity=0.5, mask_structure="2:4"))


def test_only_the_source_rank_writes_the_report_and_permutations(monkeypatch, tmp_path):
    """llm-compressor saves from rank 0 only; the files the modifier adds follow it."""
    model = build_tiny_model("llama")
    artifacts.write_artifacts_on_save(model, {"sites": []}, {"residual": torch.arange(64)})
    monkeypatch.setattr(artifacts, "is_source_process", lambda: False)
    model.save_pretrained(tmp_path / "rank1")
    assert not (tmp_path / "rank1" / REPORT_FILE).exists() and not (tmp_path / "rank1" / PERMUTATIONS_FILE).exists()
    monkeypatch.setattr(artifacts, "is_source_process", lambda: True)
    model.save_pretrained(tmp_path / "rank0")
    assert (tmp_path / "rank0" / REPORT_FILE).exists() and (tmp_path / "rank0" / PERMUTATIONS_FILE).exists()
