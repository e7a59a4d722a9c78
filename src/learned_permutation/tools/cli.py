"""The ``learned-permutation`` command line.

Each subcommand is a function ``add_<name>_command(subparsers) -> ArgumentParser`` that adds its
parser and sets ``func`` to a handler ``(args) -> exit code``; `COMMANDS` lists them, so a new
subcommand is one such function appended there. Handlers import their heavy modules lazily, but
importing the package itself loads llm-compressor (that import registers the modifier for recipes),
so even ``--help`` takes several seconds on a CPU machine. Input errors print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from learned_permutation.tools.data import MODEL_SAMPLES, InputError
from learned_permutation.tools.export import add_export_command


def _convert_llama2c(args: argparse.Namespace) -> int:
    from learned_permutation.tools.llama2c import Llama2cFormatError, convert_llama2c

    for path in (args.checkpoint, args.tokenizer_model):
        if not Path(path).is_file():
            raise InputError(f"file not found: {path}")
    try:
        convert_llama2c(Path(args.checkpoint), Path(args.tokenizer_model), Path(args.output_dir))
    except Llama2cFormatError as error:
        raise InputError(str(error)) from error
    print(f"wrote {args.output_dir}")
    return 0


def add_convert_llama2c_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert-llama2c",
        help="convert a llama2.c checkpoint (e.g. stories260K) to a Hugging Face Llama directory",
    )
    parser.add_argument("checkpoint", help="llama2.c legacy-v0 .bin file")
    parser.add_argument("tokenizer_model", help="the SentencePiece .model it was trained with")
    parser.add_argument("output_dir", help="directory to write (model, config, tokenizer)")
    parser.set_defaults(func=_convert_llama2c)
    return parser


def _oneshot(args: argparse.Namespace) -> int:
    from learned_permutation.tools.compress import run_oneshot

    run_oneshot(
        args.model_dir,
        args.recipe,
        args.dataset,
        args.output_dir,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        pipeline=args.pipeline,
        seed=args.seed,
        text_column=args.text_column,
        precision=args.precision,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.output_dir}")
    return 0


def add_oneshot_command(subparsers) -> argparse.ArgumentParser:
    from learned_permutation.tools.compress import PIPELINES, PRECISIONS

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
    parser.add_argument("--precision", choices=PRECISIONS, default="float32", help="dtype to load the model in")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.set_defaults(func=_oneshot)
    return parser


def _load_causal_lm(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    from learned_permutation.tools.compress import check_model_dir

    check_model_dir(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _read_eval_text(path: str, text_format: str) -> str:
    from learned_permutation.tools.evaluation import wikitext_eval_text

    if not Path(path).is_file():
        raise InputError(f"evaluation text file not found: {path}")
    return wikitext_eval_text(path) if text_format == "wikitext" else Path(path).read_text(encoding="utf-8")


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from learned_permutation.tools.compress import check_model_dir, check_seq_len
    from learned_permutation.tools.evaluation import kl_divergence, perplexity

    config = check_model_dir(args.model_dir)
    seq_len = args.seq_len or config.max_position_embeddings
    check_seq_len(config, seq_len)
    text = _read_eval_text(args.text_file, args.format)
    reference = _load_causal_lm(args.reference) if args.reference else None
    model, tokenizer = _load_causal_lm(args.model_dir), AutoTokenizer.from_pretrained(args.model_dir)

    report = {"model": args.model_dir, "text": args.text_file, "format": args.format, "seq_len": seq_len}
    if reference is None:
        result = perplexity(model, tokenizer, text, seq_len, args.batch_size, args.max_windows)
    else:
        compared = kl_divergence(reference, model, tokenizer, text, seq_len, args.batch_size, args.max_windows)
        result = compared.model
        report |= {"reference": args.reference, "reference_ppl": compared.reference.ppl, "kl": compared.kl}
    report |= {"tokens": result.tokens, "nll": result.nll, "ppl": result.ppl}
    for key, value in report.items():
        print(f"{key:>13}  {value:.6g}" if isinstance(value, float) else f"{key:>13}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def add_eval_command(subparsers) -> argparse.ArgumentParser:
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
    parser.set_defaults(func=_eval)
    return parser


COMMANDS: list[Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = [
    add_convert_llama2c_command,
    add_oneshot_command,
    add_eval_command,
    add_export_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="learned-permutation",
        description="Learned channel permutations for N:M sparsity, with llm-compressor.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every input is local; never reach for a hub
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
