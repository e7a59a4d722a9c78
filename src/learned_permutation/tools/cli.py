"""Handlers of the ``learned-permutation`` subcommands (the parser is ``learned_permutation_cli``).

``run_command(args)`` runs the handler named by ``args.command``. Handlers import their heavy modules
lazily. Input errors print one line ``error: ...`` and exit with status 2; unless ``--verbose``,
third-party logs and progress bars are quieted (``learned_permutation.tools.logs``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from learned_permutation.tools.data import InputError
from learned_permutation.tools.logs import quiet_third_party_logs


def _convert_llama2c(args: argparse.Namespace) -> int:
    from learned_permutation.tools.llama2c import Llama2cFormatError, convert_llama2c
    from learned_permutation.tools.output import refuse_existing_output

    for path in (args.checkpoint, args.tokenizer_model):
        if not Path(path).is_file():
            raise InputError(f"file not found: {path}")
    refused = refuse_existing_output(args.output_dir, args.overwrite)
    if refused:
        raise InputError(refused)
    try:
        convert_llama2c(Path(args.checkpoint), Path(args.tokenizer_model), Path(args.output_dir), args.overwrite)
    except Llama2cFormatError as error:
        raise InputError(str(error)) from error
    print(f"wrote {args.output_dir}")
    return 0


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
        export_format=args.export,
    )
    print(f"wrote {args.output_dir}")
    return 0


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


def _export(args: argparse.Namespace) -> int:
    from learned_permutation.tools.export import ExportError, export_checkpoint

    try:
        export_checkpoint(args.in_dir, args.out_dir, args.format, dtype=args.dtype, overwrite=args.overwrite)
    except ExportError as error:
        raise InputError(str(error)) from error
    print(f"wrote {args.out_dir}")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "convert-llama2c": _convert_llama2c,
    "oneshot": _oneshot,
    "eval": _eval,
    "export": _export,
}


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; an InputError becomes one ``error:`` line and status 2."""
    if not args.verbose:
        quiet_third_party_logs()
    try:
        return HANDLERS[args.command](args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
