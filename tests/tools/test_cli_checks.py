"""The command line's promises of issue 13: bad inputs are one ``error:`` line and status 2 before the
model loads; a failed run never costs the previous output; the checkpoint's dtype is kept; ``--help``
imports nothing heavy; third-party logs are quiet by default."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_llama2c import EMBEDDED_TOKENIZER_MODEL, _write_synthetic_checkpoint

from learned_permutation_cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
WANDA_PERMUTED = RECIPES / "wanda_2of4_permuted.yaml"
SPARSEGPT_PERMUTED = RECIPES / "sparsegpt_2of4_permuted.yaml"


def recipe_file(tmp_path, modifiers: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"sparsity_stage": {"sparsity_modifiers": modifiers}}, sort_keys=False))
    return path


def permutation(**fields):
    return {"LearnedPermutationModifier": {"mask_structure": "2:4", "method": "greedy", **fields}}


def wanda(mask="2:4"):
    return {"WandaPruningModifier": {"sparsity": 0.5, "mask_structure": mask, "targets": ["Linear"],
                                     "ignore": ["re:.*lm_head"]}}


def model_folder(source: Path, destination: Path, weights=True, tokenizer=True, **config_changes) -> Path:
    """A copy of ``source`` with config.json edited; without weights, any error proves the check ran
    before the model was loaded."""
    destination.mkdir()
    for path in source.iterdir():
        if (path.name.endswith(".safetensors") and not weights) or (path.name.startswith("tokenizer") and not tokenizer):
            continue
        shutil.copy(path, destination / path.name)
    config = json.loads((destination / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps({**config, **config_changes}))
    return destination


def oneshot_error(capsys, model_dir, recipe, output_dir="unused", *options, dataset="model-samples") -> str:
    code = main(["oneshot", str(model_dir), str(recipe), str(dataset), "--output-dir", str(output_dir),
                 "--num-samples", "4", "--seq-len", "32", *options])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "modifiers, config_changes, message",
    [
        ({**wanda(), **permutation()}, {}, "placed after WandaPruningModifier"),
        ({**permutation(), **wanda("4:8")}, {}, "mask_structure mismatch"),
        ({**permutation(solver_args={"sweepz": 2}), **wanda()}, {}, r"solver_args \['sweepz'\]"),
        ({**permutation(), **wanda()}, {"architectures": ["GPT2LMHeadModel"]}, "no architecture mapping for GPT2LMHeadModel"),
        ({**permutation(), **wanda()}, {"intermediate_size": 130}, "130 channels, not a multiple of M=4"),
    ],
)
def test_recipe_and_config_errors_come_before_the_model_loads(capsys, tiny_llama_dir, tmp_path, modifiers,
                                                              config_changes, message):
    folder = model_folder(tiny_llama_dir, tmp_path / "model", weights=False, **config_changes)
    err = oneshot_error(capsys, folder, recipe_file(tmp_path, modifiers))
    assert re.search(message, err), err


def test_a_folder_without_tokenizer_is_refused_before_loading(capsys, tiny_llama_dir, tmp_path):
    folder = model_folder(tiny_llama_dir, tmp_path / "model", weights=False, tokenizer=False)
    assert "has no tokenizer" in oneshot_error(capsys, folder, WANDA_PERMUTED)


def test_failing_overwrite_run_keeps_the_previous_output(capsys, tiny_llama_dir, tmp_path):
    """The failure comes from inside oneshot (NaN weights, found at the modifier's initialisation), after
    the old code had already deleted the output folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    broken = model_folder(tiny_llama_dir, tmp_path / "broken")
    model.save_pretrained(broken)
    previous = tmp_path / "out"
    previous.mkdir()
    (previous / "model.safetensors").write_text("the previous good checkpoint")
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a fox. The fox met a dog and they played all day.\n" * 40)
    err = oneshot_error(capsys, broken, WANDA_PERMUTED, previous, "--overwrite", dataset=text)
    assert "model.layers.0.mlp.up_proj.weight contains NaN" in err
    assert (previous / "model.safetensors").read_text() == "the previous good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out", "text.txt"]  # no staging folder left


def test_bfloat16_checkpoint_is_pruned_and_saved_in_bfloat16(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    source = model_folder(tiny_llama_dir, tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(source)
    output = tmp_path / "out"
    (output).mkdir()
    (output / "old.txt").write_text("replaced only on success")
    code = main(["oneshot", str(source), str(WANDA_PERMUTED), "model-samples", "--output-dir", str(output),
                 "--num-samples", "8", "--seq-len", "32", "--overwrite"])
    assert code == 0 and not (output / "old.txt").exists()
    pruned = AutoModelForCausalLM.from_pretrained(output)
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"


def test_convert_llama2c_refuses_a_non_empty_folder_and_keeps_it_on_failure(capsys, tmp_path):
    checkpoint = _write_synthetic_checkpoint(tmp_path / "model.bin", tied=True)
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert main(["convert-llama2c", str(checkpoint), str(EMBEDDED_TOKENIZER_MODEL), str(output)]) == 2
    assert "is not empty" in capsys.readouterr().err
    broken = tmp_path / "broken.bin"
    broken.write_bytes(checkpoint.read_bytes()[:40])
    assert main(["convert-llama2c", str(broken), str(EMBEDDED_TOKENIZER_MODEL), str(output), "--overwrite"]) == 2
    assert (output / "keep.txt").read_text() == "mine"
    assert main(["convert-llama2c", str(checkpoint), str(EMBEDDED_TOKENIZER_MODEL), str(output), "--overwrite"]) == 0
    assert (output / "config.json").is_file() and not (output / "keep.txt").exists()


def test_parsing_the_command_line_imports_nothing_heavy():
    """What keeps ``learned-permutation --help`` fast (about 0.03 s instead of 6 s)."""
    probe = (
        "import sys, learned_permutation_cli as cli\n"
        "cli.build_parser().parse_args(['export', 'a', 'b'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'llmcompressor', 'learned_permutation') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_oneshot_output_is_quiet_by_default(tiny_llama_dir, tmp_path):
    """No per-Linear METRIC lines or repeated "No accelerator available" warnings unless --verbose."""
    command = [sys.executable, "-m", "learned_permutation_cli", "oneshot", str(tiny_llama_dir),
               str(SPARSEGPT_PERMUTED), "model-samples", "--output-dir", str(tmp_path / "out"),
               "--num-samples", "4", "--seq-len", "32"]
    result = subprocess.run(command, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("No accelerator available") <= 1 and "METRIC" not in output
    assert "Preparing cache" not in output and "Calibrating" not in output  # llm-compressor's progress bars
    assert result.stdout.strip().splitlines()[-1] == f"wrote {tmp_path / 'out'}"
