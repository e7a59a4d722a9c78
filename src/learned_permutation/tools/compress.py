"""A thin layer over ``llmcompressor.oneshot`` for a local model and offline calibration data.

What it adds to a plain ``oneshot`` call:

* recipes can name ``LearnedPermutationModifier``: importing this module imports the
  ``learned_permutation`` package, which registers it with llm-compressor (docs/architecture.md);
* cheap checks before anything heavy is loaded: model directory, recipe (YAML, at least one modifier,
  valid modifier arguments), calibration file, sample count, sequence length against the model's
  ``max_position_embeddings``; each error says what is wrong and how to fix it;
* calibration data from a text file, a parquet file or samples of the model itself (`data.py`), the
  rows chosen by a seeded shuffle and fed in a fixed order, so a run is reproducible under ``seed``;
* the model is loaded here in ``precision`` (what ``oneshot(precision=...)`` would do), because
  sampling calibration text needs it before ``oneshot`` starts.

``oneshot`` needs the model saved on disk (it reloads its config from ``name_or_path``) and a tokenizer
next to it. Set ``HF_HUB_OFFLINE=1``: nothing here needs the hub.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from loguru import logger

from learned_permutation.tools.data import MODEL_SAMPLES, InputError, file_dataset, sample_text_dataset

PIPELINES = ("independent", "sequential", "basic")
PRECISIONS = ("float32", "bfloat16", "float16")


def check_model_dir(model_dir: str | Path):
    """The model's transformers config; InputError if ``model_dir`` holds no Hugging Face model."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise InputError(
            f"{model_dir} holds no config.json: give a directory written by save_pretrained "
            "(convert llama2.c checkpoints first with `learned-permutation convert-llama2c`)"
        )
    return AutoConfig.from_pretrained(model_dir)


def read_recipe_yaml(recipe_path: str | Path) -> dict:
    """The recipe file parsed as YAML, without building modifiers (cheap, no llm-compressor import)."""
    recipe_path = Path(recipe_path)
    if not recipe_path.is_file():
        raise InputError(f"recipe file not found: {recipe_path}")
    try:
        content = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise InputError(f"recipe {recipe_path} is not valid YAML: {error}") from error
    if not isinstance(content, dict):
        raise InputError(f"recipe {recipe_path} must be a YAML mapping of stages, got {type(content).__name__}")
    return content


def load_recipe(recipe_path: str | Path):
    """The llm-compressor ``Recipe`` for ``recipe_path``, with its modifiers built (and their arguments
    validated). llm-compressor silently skips keys outside ``<name>_stage: <name>_modifiers:``, so a
    recipe that yields no modifier is an error here rather than a run that changes nothing."""
    read_recipe_yaml(recipe_path)
    from llmcompressor.recipe import Recipe

    try:
        recipe = Recipe.create_instance(str(recipe_path))
    except ValueError as error:  # unknown modifier, invalid modifier arguments (pydantic)
        raise InputError(f"recipe {recipe_path} is invalid: {error}") from error
    if not recipe.modifiers:
        raise InputError(
            f"recipe {recipe_path} defines no modifiers: llm-compressor reads them only as "
            "`<name>_stage: {<name>_modifiers: {ModifierClass: {arguments}}}`"
        )
    return recipe


def check_seq_len(config, seq_len: int) -> None:
    """InputError unless ``0 < seq_len <= max_position_embeddings`` (when the config defines it)."""
    if seq_len <= 0:
        raise InputError(f"sequence length must be positive, got {seq_len}")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise InputError(
            f"sequence length {seq_len} exceeds the model's context (max_position_embeddings={context}); "
            f"use a sequence length of at most {context}"
        )


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise InputError(f"output directory {output_dir} is not empty: choose another or allow overwriting")


def _select_rows(dataset, num_samples: int, seed: int):
    if len(dataset) < num_samples:
        logger.warning(f"calibration data has {len(dataset)} rows, fewer than the {num_samples} requested; using all")
    return dataset.shuffle(seed=seed).select(range(min(num_samples, len(dataset))))


def run_oneshot(
    model_dir: str | Path,
    recipe_path: str | Path,
    dataset: str | Path,
    output_dir: str | Path,
    num_samples: int = 128,
    seq_len: int = 256,
    pipeline: str = "independent",
    seed: int = 0,
    text_column: str = "text",
    precision: str = "float32",
    overwrite: bool = False,
):
    """Compress ``model_dir`` with the recipe at ``recipe_path``; save to ``output_dir``; return the model.

    ``dataset`` is a text file, a ``.parquet`` file (column ``text_column``) or ``"model-samples"``
    (``num_samples`` texts of ``seq_len`` tokens sampled from the model itself under ``seed``).
    """
    config = check_model_dir(model_dir)
    read_recipe_yaml(recipe_path)
    if num_samples <= 0:
        raise InputError(f"number of calibration samples must be positive, got {num_samples}")
    check_seq_len(config, seq_len)
    if pipeline not in PIPELINES:
        raise InputError(f"unknown pipeline {pipeline!r}; choose one of {PIPELINES}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    calibration = None if str(dataset) == MODEL_SAMPLES else file_dataset(dataset, text_column)
    recipe = load_recipe(recipe_path)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, precision))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if calibration is None:
        calibration = sample_text_dataset(model, tokenizer, num_samples, seq_len, seed)
    calibration = _select_rows(calibration, num_samples, seed)
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)  # only now: a run that failed its checks leaves the old output alone
    return compress(model, tokenizer, recipe, calibration, seq_len, output_dir, pipeline)


def compress(model, tokenizer, recipe, calibration, seq_len: int, output_dir: str | Path | None, pipeline: str = "independent"):
    """``oneshot`` on a model loaded from a saved directory, calibrating on every row of ``calibration``
    (a ``text`` Dataset) in a fixed order, each truncated to ``seq_len`` tokens. Saves to ``output_dir``
    unless it is None. ``recipe`` is anything ``oneshot`` accepts (path, ``Recipe``, modifiers)."""
    from llmcompressor import oneshot

    return oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=calibration,
        num_calibration_samples=len(calibration),
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        pipeline=pipeline,
        output_dir=None if output_dir is None else str(output_dir),
    )
