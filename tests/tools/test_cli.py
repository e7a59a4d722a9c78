from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from shared_helpers import TINY_LLAMA, shared_file

from learned_permutation_cli import main
from learned_permutation.tools.compress import load_recipe
from learned_permutation.tools.evaluation import check_nm_sparsity, kl_divergence, perplexity

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
WANDA_2OF4 = RECIPES / "wanda_2of4.yaml"


@pytest.fixture
def config_only_dir(tiny_llama_dir, tmp_path) -> Path:
    """A model directory with config and tokenizer but no weights: loading the model would fail, so an
    error about anything else proves the check ran before the model was loaded."""
    directory = tmp_path / "config_only"
    directory.mkdir()
    for path in tiny_llama_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, directory / path.name)
    return directory


@pytest.fixture
def story_file(tmp_path) -> Path:
    path = tmp_path / "stories.txt"
    path.write_text("Once upon a time there was a fox.\n\nThe fox met a dog. They played.\n", encoding="utf-8")
    return path


def _oneshot_error(capsys, model_dir, recipe, dataset, *options) -> str:
    code = main(["oneshot", str(model_dir), str(recipe), str(dataset), "--output-dir", "unused", "--seq-len", "32", *options])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("convert-llama2c", "oneshot", "eval", "export"):
        assert command in out


def test_oneshot_rejects_a_missing_model_dir(capsys, tmp_path, story_file):
    err = _oneshot_error(capsys, tmp_path / "nope", WANDA_2OF4, story_file)
    assert "model directory not found" in err


def test_oneshot_rejects_a_directory_without_config(capsys, tmp_path, story_file):
    err = _oneshot_error(capsys, tmp_path, WANDA_2OF4, story_file)
    assert "holds no config.json" in err


def test_oneshot_rejects_missing_and_malformed_recipes(capsys, config_only_dir, story_file, tmp_path):
    assert "recipe file not found" in _oneshot_error(capsys, config_only_dir, tmp_path / "none.yaml", story_file)

    broken = tmp_path / "broken.yaml"
    broken.write_text("sparsity_stage:\n  sparsity_modifiers: [unclosed\n", encoding="utf-8")
    assert "is not valid YAML" in _oneshot_error(capsys, config_only_dir, broken, story_file)

    flat = tmp_path / "flat.yaml"  # a modifier outside <name>_stage/<name>_modifiers: llm-compressor skips it
    flat.write_text('WandaPruningModifier:\n  sparsity: 0.5\n  mask_structure: "2:4"\n', encoding="utf-8")
    assert "defines no modifiers" in _oneshot_error(capsys, config_only_dir, flat, story_file)

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("s_stage:\n  s_modifiers:\n    NoSuchModifier: {}\n", encoding="utf-8")
    err = _oneshot_error(capsys, config_only_dir, unknown, story_file)
    assert "is invalid" in err and "NoSuchModifier" in err


def test_recipes_can_name_the_permutation_modifier():
    recipe = load_recipe(RECIPES / "sparsegpt_2of4_permuted.yaml")
    assert [type(modifier).__name__ for modifier in recipe.modifiers] == [
        "LearnedPermutationModifier", "SparseGPTModifier"
    ]


def test_oneshot_rejects_datasets_without_text(capsys, config_only_dir, tmp_path):
    err = _oneshot_error(capsys, config_only_dir, WANDA_2OF4, tmp_path / "missing.txt")
    assert "text file not found" in err

    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n", encoding="utf-8")
    assert "calibration set is empty" in _oneshot_error(capsys, config_only_dir, WANDA_2OF4, blank)

    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["some text"]}), table)
    assert "no column 'text'" in _oneshot_error(capsys, config_only_dir, WANDA_2OF4, table)


def test_oneshot_rejects_bad_sizes(capsys, config_only_dir, story_file):
    err = _oneshot_error(capsys, config_only_dir, WANDA_2OF4, story_file, "--num-samples", "0")
    assert "samples must be positive" in err
    context = TINY_LLAMA["max_position_embeddings"]
    err = _oneshot_error(capsys, config_only_dir, WANDA_2OF4, story_file, "--seq-len", str(context + 1))
    assert f"exceeds the model's context (max_position_embeddings={context})" in err


def test_oneshot_refuses_a_non_empty_output_dir(capsys, config_only_dir, story_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    err = _oneshot_error(capsys, config_only_dir, WANDA_2OF4, story_file, "--output-dir", str(tmp_path / "out"))
    assert "is not empty" in err


def test_oneshot_wanda_2of4_saves_an_exact_2of4_checkpoint(tiny_llama_dir, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "wanda"
    code = main([
        "oneshot", str(tiny_llama_dir), str(WANDA_2OF4), "model-samples",
        "--output-dir", str(output), "--num-samples", "8", "--seq-len", "32", "--seed", "1",
    ])
    assert code == 0
    assert (output / "recipe.yaml").is_file()
    pruned = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    dense, _ = tiny_llama

    report = check_nm_sparsity(pruned, 2, 4)
    assert report.ok, report.failures
    assert len(report.modules) == 7 * TINY_LLAMA["num_hidden_layers"]  # q k v o gate up down
    assert all(module.density == 0.5 for module in report.modules)  # Wanda 2:4 keeps exactly 2 of 4
    dense_weights, pruned_weights = dense.state_dict(), pruned.state_dict()
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(dense_weights[name], pruned_weights[name])
    for module in report.modules:  # kept weights are the dense ones (Wanda only masks)
        kept = pruned_weights[f"{module.name}.weight"] != 0
        assert torch.equal(pruned_weights[f"{module.name}.weight"][kept], dense_weights[f"{module.name}.weight"][kept])


def test_eval_prints_and_writes_perplexity_and_kl(tiny_llama_dir, tiny_llama, story_file, tmp_path, capsys):
    model, tokenizer = tiny_llama
    out = tmp_path / "eval.json"
    code = main(["eval", str(tiny_llama_dir), str(story_file), "--seq-len", "16", "--reference",
                 str(tiny_llama_dir), "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    text = story_file.read_text(encoding="utf-8")
    expected = perplexity(model, tokenizer, text, seq_len=16)
    assert report["tokens"] == expected.tokens
    assert report["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    assert abs(report["kl"]) < 1e-7
    assert "ppl" in capsys.readouterr().out
    assert kl_divergence(model, model, tokenizer, text, 16).kl == pytest.approx(report["kl"], abs=1e-7)


def test_eval_reads_wikitext_files_as_joined_rows(tiny_llama_dir, tiny_llama, tmp_path):
    from learned_permutation.tools.evaluation import wikitext_eval_text

    model, tokenizer = tiny_llama
    raw = tmp_path / "wiki.raw"
    raw.write_text(" \n = Title = \n \n Some text , here .\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_llama_dir), str(raw), "--format", "wikitext", "--seq-len", "16", "--json", str(out)]) == 0
    expected = perplexity(model, tokenizer, wikitext_eval_text(raw), seq_len=16)
    report = json.loads(out.read_text())
    assert report["tokens"] == expected.tokens and report["ppl"] == pytest.approx(expected.ppl, rel=1e-6)


def test_eval_rejects_a_window_longer_than_the_context(tiny_llama_dir, story_file, capsys):
    assert main(["eval", str(tiny_llama_dir), str(story_file), "--seq-len", "4096"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_convert_llama2c_reports_missing_files(tmp_path, capsys):
    assert main(["convert-llama2c", str(tmp_path / "x.bin"), str(tmp_path / "t.model"), str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_convert_llama2c_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = shared_file("stories260k/stories260K.bin")
    tokenizer_model = shared_file("stories260k/tok512.model")
    assert main(["convert-llama2c", str(checkpoint), str(tokenizer_model), str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.hidden_size == 64 and len(AutoTokenizer.from_pretrained(tmp_path / "hf")) == 512
