"""A thin layer over ``llmcompressor.oneshot`` for a local model and offline calibration data.

What it adds to a plain ``oneshot`` call:

* recipes can name ``LearnedPermutationModifier``: importing this module imports the
  ``learned_permutation`` package, which registers it with llm-compressor (docs/architecture.md);
* cheap checks before anything heavy is loaded: model directory and its tokenizer, recipe (YAML, at
  least one modifier, valid modifier arguments, and ``LearnedPermutationModifier``'s checks that need only
  the recipe and config.json: recipe order, mask structure, architecture, divisibility of the sites),
  calibration file, sample count, sequence length against the model's ``max_position_embeddings``; each
  error says what is wrong and how to fix it;
* calibration data from a text file, a parquet file or samples of the model itself (`data.py`), the
  rows chosen by a seeded shuffle and fed in a fixed order, so a run is reproducible under ``seed``;
* the model is loaded here in ``precision`` (default: the checkpoint's own dtype), because sampling
  calibration text needs it before ``oneshot`` starts;
* the output is written to a folder beside ``output_dir`` and moved there only after success
  (``output.py``), so a failed ``--overwrite`` run keeps the previous output;
* ``export_format`` rewrites the saved folder for a serving runtime (``export.export_in_place``): with
  ``vllm-2of4`` the folder oneshot leaves loads in vLLM 0.18.1 with its 2:4 kernels, bf16 or FP8 alike.

``oneshot`` needs the model saved on disk (it reloads its config from ``name_or_path``) and a tokenizer
next to it. Set ``HF_HUB_OFFLINE=1``: nothing here needs the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from loguru import logger

from learned_permutation.tools.data import InputError, file_dataset, sample_text_dataset
from learned_permutation.tools.output import refuse_existing_output, staged_output
from learned_permutation_cli import EXPORT_FORMATS, MODEL_SAMPLES, PIPELINES, PRECISIONS

# Files any of which makes a folder's tokenizer loadable without a hub.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


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


def check_tokenizer_files(model_dir: str | Path) -> None:
    """InputError unless ``model_dir`` holds a tokenizer (``oneshot`` needs one beside the model)."""
    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's tokenizer "
            "into the folder (tokenizer.save_pretrained(model_dir))"
        )


def checkpoint_dtype(config) -> str:
    """The dtype the checkpoint was saved in (config ``dtype``), float32 when the config does not say."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in PRECISIONS else "float32"


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
        reasons = [detail["msg"] for detail in error.errors()] if hasattr(error, "errors") else [str(error)]
        raise InputError(f"recipe {recipe_path} is invalid: {'; '.join(reasons)}") from error
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


def check_recipe_for_model(recipe, config, recipe_path) -> None:
    """InputError for what ``LearnedPermutationModifier`` would refuse at initialisation, from config.json."""
    from learned_permutation.plugin.recipe_checks import check_recipe

    try:
        check_recipe(recipe.modifiers, config)
    except ValueError as error:
        raise InputError(f"recipe {recipe_path}: {error}") from error


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
    precision: str = "auto",
    overwrite: bool = False,
    export_format: str | None = None,
):
    """Compress ``model_dir`` with the recipe at ``recipe_path``; save to ``output_dir``; return the model.

    ``dataset`` is a text file, a ``.parquet`` file (column ``text_column``) or ``"model-samples"``
    (``num_samples`` texts of ``seq_len`` tokens sampled from the model itself under ``seed``).
    ``precision``: ``auto`` (the checkpoint's dtype) or a dtype name. ``export_format`` (None: the
    folder as llm-compressor saves it) rewrites the saved folder in that export format; if the export
    refuses, the InputError says why and the folder keeps llm-compressor's checkpoint.
    """
    config = check_model_dir(model_dir)
    check_tokenizer_files(model_dir)
    read_recipe_yaml(recipe_path)
    if num_samples <= 0:
        raise InputError(f"number of calibration samples must be positive, got {num_samples}")
    check_seq_len(config, seq_len)
    if pipeline not in PIPELINES:
        raise InputError(f"unknown pipeline {pipeline!r}; choose one of {PIPELINES}")
    if precision not in ("auto", *PRECISIONS):
        raise InputError(f"unknown precision {precision!r}; choose auto or one of {PRECISIONS}")
    precision = checkpoint_dtype(config) if precision == "auto" else precision
    if export_format is not None and export_format not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {export_format!r}; choose one of {EXPORT_FORMATS}")
    if export_format == "vllm-2of4" and precision == "float32":
        raise InputError("the vllm-2of4 export serves float16/bfloat16 models (vLLM 0.18.1's 2:4 kernels); "
                         "load the model with --precision bfloat16 (precision='bfloat16')")
    refused = refuse_existing_output(output_dir, overwrite)
    if refused:
        raise InputError(refused)
    calibration = None if str(dataset) == MODEL_SAMPLES else file_dataset(dataset, text_column)
    recipe = load_recipe(recipe_path)
    check_recipe_for_model(recipe, config, recipe_path)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, precision))
    if calibration is None:
        calibration = sample_text_dataset(model, tokenizer, num_samples, seq_len, seed)
    calibration = _select_rows(calibration, num_samples, seed)
    from learned_permutation.plugin.recipe_checks import RecipeCheckError

    try:
        with staged_output(output_dir) as staging:
            model = compress(model, tokenizer, recipe, calibration, seq_len, staging, pipeline)
    except RecipeCheckError as error:  # refused at initialisation, from the weights or the calibration data
        raise InputError(str(error)) from error
    if export_format is not None:
        from learned_permutation.tools.export import ExportError, export_in_place

        try:
            export_in_place(output_dir, export_format)
        except ExportError as error:
            raise InputError(f"{error}\n{output_dir} holds the checkpoint as llm-compressor saved it") from error
    return model


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
