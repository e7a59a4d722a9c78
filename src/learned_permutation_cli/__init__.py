"""The ``learned-permutation`` command line: argument parsing only, importing nothing but the standard
library, so ``--help`` and argument errors answer at once.

It lives outside the ``learned_permutation`` package on purpose: importing that package imports
llm-compressor (several seconds), because ``import learned_permutation`` registers the modifier for YAML
recipes. Each subcommand parser sets ``command``; after parsing, ``main`` hands the arguments to the
handler of that name in ``learned_permutation.tools.cli``, which does the heavy imports. The option
vocabularies below (pipelines, precisions, export formats) are the single definition the tools import.
"""

from __future__ import annotations

import argparse
import os

MODEL_SAMPLES = "model-samples"
"""Name of the calibration source that samples text from the model being compressed."""
PIPELINES = ("independent", "sequential", "basic")
PRECISIONS = ("float32", "bfloat16", "float16")
EXPORT_FORMATS = ("plain", "vllm-2of4")


def _add_convert_llama2c(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-llama2c",
        help="convert a llama2.c checkpoint (e.g. stories260K) to a Hugging Face Llama directory",
    )
    parser.add_argument("checkpoint", help="llama2.c legacy-v0 .bin file")
    parser.add_argument("tokenizer_model", help="the SentencePiece .model it was trained with")
    parser.add_argument("output_dir", help="directory to write (model, config, tokenizer)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output directory (only once the conversion succeeded)")


def _add_oneshot(subparsers) -> None:
    parser = subparsers.add_parser(
        "oneshot",
        help="run an llm-compressor recipe on a local model with offline calibration data",
        description="llmcompressor.oneshot with the LearnedPermutationModifier registered, offline data and "
        "early checks of every input (see learned_permutation.tools.compress).",
    )
    parser.add_argument("model_dir", help="Hugging Face model directory (with its tokenizer)")
    parser.add_argument("recipe", help="llm-compressor recipe YAML")
    parser.add_argument(
        "dataset",
        help=f"calibration text: a text file (blank-line paragraphs), a .parquet file, or {MODEL_SAMPLES!r} "
        "to sample text from the model itself",
    )
    parser.add_argument("--output-dir", required=True, help="where to save the compressed model")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration samples (default 128)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    parser.add_argument("--pipeline", choices=PIPELINES, default="independent",
                        help="llm-compressor calibration pipeline (default independent)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and row selection")
    parser.add_argument("--text-column", default="text", help="text column of a parquet dataset")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="dtype to load the model in (default auto: the checkpoint's own dtype)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output directory (only once the run succeeded)")
    parser.add_argument("--export", choices=EXPORT_FORMATS, default=None,
                        help="write the output folder in this export format: vllm-2of4 for vLLM 0.18.1's 2:4 kernels "
                        "(bf16 or FP8 W8A8), plain for transformers, lm-eval and any vLLM (default: the folder as "
                        "llm-compressor saves it)")


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity of a checkpoint on a text file, optionally KL(reference || checkpoint)",
        description="Token perplexity over non-overlapping BOS-prefixed windows (see "
        "learned_permutation.tools.evaluation); with --reference, the mean KL divergence of the "
        "checkpoint's next-token distributions from the reference's on the same tokens.",
    )
    parser.add_argument("model_dir", help="Hugging Face model directory")
    parser.add_argument("text_file", help="UTF-8 text to evaluate on")
    parser.add_argument("--format", choices=("plain", "wikitext"), default="plain",
                        help="plain: the file as is; wikitext: WikiText raw rows joined by blank lines")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's context)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first windows")
    parser.add_argument("--reference", help="reference model directory (same tokenizer) for KL divergence")
    parser.add_argument("--json", help="also write the results to this JSON file")


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a pruned checkpoint for a serving runtime",
        description="plain: ordinary checkpoint for transformers, lm-eval and any vLLM. vllm-2of4: "
        "compressed-tensors sparse-24-bitmask layout for vLLM 0.18.1's 2:4 kernels (Hopper GPUs).",
    )
    parser.add_argument("in_dir", help="checkpoint folder written by oneshot / save_pretrained")
    parser.add_argument("out_dir", help="folder to create")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="plain")
    parser.add_argument("--dtype", choices=PRECISIONS, default=None,
                        help="cast floating tensors (vllm-2of4 needs bfloat16 or float16)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists (only once the export succeeded)")


COMMANDS = {"convert-llama2c": _add_convert_llama2c, "oneshot": _add_oneshot, "eval": _add_eval, "export": _add_export}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="learned-permutation",
        description="Learned channel permutations for N:M sparsity, with llm-compressor.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="also show llm-compressor's, transformers' and datasets' own logs and progress bars")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS.values():
        add_command(subparsers)
    return parser


# Environment that quiets third-party output; it must be set before those libraries are imported
# (tqdm reads TQDM_* when it is imported). llm-compressor's own logs are switched off after its import
# (learned_permutation.tools.logs): its LLM_COMPRESSOR_LOG_DISABLED also skips defining the METRIC log
# level that its SparseGPT then logs at, which crashes llm-compressor 0.14.0.1.
QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",  # else llm-compressor warns that it disables it
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",
}


def quiet_environment() -> None:
    """Quiet third-party logs, warnings and progress bars of this process (where not already set)."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import warnings

    warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every input is local; never reach for a hub
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_environment()
    from learned_permutation.tools.cli import run_command

    return run_command(args)
