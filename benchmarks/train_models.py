"""Train small Llama benchmark models on the shared English Gutenberg corpus, with their own tokenizer.

Each run trains (or reuses) a byte-level BPE on the training books, pre-trains a `LlamaForCausalLM` preset with
AdamW and a warmup+cosine schedule, saves a transformers checkpoint (safetensors + config + tokenizer) to
``<output-dir>/<name>``, reloads it from disk, measures validation and WikiText-2 perplexity, and rewrites the
model card and ``results/models.md``. Runs are deterministic (seeded init, data order fixed by step), bounded
by ``--max-minutes`` and resumable: rerunning the same command continues from the saved training state.

    python benchmarks/train_models.py --preset llama-2m
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch
from loguru import logger

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from training.corpus import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, prepare_corpus, token_stream  # noqa: E402
from learned_permutation.tools.data import shared_data_dir  # noqa: E402
from learned_permutation.tools.evaluation import perplexity, text_windows, wikitext_eval_text  # noqa: E402
from training.evaluate import sample_texts, unigram_perplexity, windows  # noqa: E402
from training.loop import TrainConfig, build_model, train  # noqa: E402
from training.presets import PRESETS, validate_shape  # noqa: E402
from training.report import model_card, write_results  # noqa: E402


SAMPLE_PROMPTS = ["It was a dark and stormy night, and", "The old man looked at the sea and said"]
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    data = shared_data_dir()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--name", help="checkpoint directory name (default: <preset>-gutenberg)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "outputs" / "train_models",
                        help="tokenizer/token-id cache and resumable training states")
    parser.add_argument("--results-md", type=Path, default=REPO_ROOT / "results" / "models.md")
    parser.add_argument("--corpus-dir", type=Path, default=data / "corpus")
    parser.add_argument("--wikitext", type=Path, default=data / "wikitext2" / "wiki.valid.raw")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--val-books", type=int, default=3, help="whole books held out for validation")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-steps", type=int, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--lr", type=float, help="peak learning rate; default: the preset's")
    parser.add_argument("--warmup-steps", type=int, help="default: the preset's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, help="stop training after this long (resumable)")
    parser.add_argument("--stop-at-step", type=int,
                        help="stop at this step and export the checkpoint; rerun without it to continue training")
    parser.add_argument("--fresh", action="store_true", help="discard a saved training state and start over")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; on a shared 2-core machine 1 thread trained 2.3x faster than 2")
    parser.add_argument("--device", default="cpu", help="torch device for training and evaluation, e.g. cuda")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--val-max-windows", type=int, default=512, help="validation windows in the final eval")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--wikitext-max-windows", type=int, help="default: the whole file")
    parser.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float16")
    parser.add_argument("--reevaluate", action="store_true",
                        help="do not train: re-measure a saved checkpoint with the current evaluation code and "
                        "rewrite its metrics.json, model card and the results table")
    return parser.parse_args(argv)


def _given_or(value, default):
    return default if value is None else value


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The preset's optimisation settings, overridden by any that were given on the command line."""
    preset = PRESETS[args.preset]
    pick = _given_or
    return TrainConfig(
        max_steps=pick(args.max_steps, preset.max_steps),
        batch_size=pick(args.batch_size, preset.batch_size),
        seq_len=args.seq_len,
        learning_rate=pick(args.lr, preset.learning_rate),
        warmup_steps=pick(args.warmup_steps, preset.warmup_steps),
        seed=args.seed,
        eval_every=args.eval_every,
    )


def save_checkpoint(model, tokenizer, directory: Path, dtype: torch.dtype) -> None:
    """Weights in ``dtype`` safetensors, config and tokenizer; the directory is replaced as a whole."""
    if directory.exists():
        shutil.rmtree(directory)
    model.to(dtype).save_pretrained(directory)
    model.float()
    tokenizer.save_pretrained(directory)


def _perplexity_record(result) -> dict:
    return {"perplexity": result.ppl, "nll": result.nll, "scored_tokens": result.tokens}


def evaluate_checkpoint(directory: Path, corpus, args, cfg: TrainConfig) -> dict:
    """Reload the saved checkpoint (as stored) and measure validation, unigram and WikiText-2 perplexity with
    the project's `perplexity`, so pruned variants evaluated by the benchmarks compare with these numbers."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not torch.equal(token_stream(tokenizer, corpus.val_books), corpus.val_tokens):
        raise RuntimeError("the saved tokenizer does not reproduce the cached validation token ids")
    val_text = f"\n{EOS_TOKEN}\n".join(corpus.val_books)
    wiki_text = wikitext_eval_text(args.wikitext)
    logger.info(f"evaluating {directory.name} on validation books and WikiText-2")
    val = perplexity(model, tokenizer, val_text, cfg.seq_len, args.eval_batch_size, args.val_max_windows)
    wiki = perplexity(model, tokenizer, wiki_text, cfg.seq_len, args.eval_batch_size, args.wikitext_max_windows)
    val_windows = text_windows(tokenizer, val_text, cfg.seq_len, args.val_max_windows)
    return {
        "val": _perplexity_record(val),
        "unigram_val_perplexity": unigram_perplexity(corpus.train_tokens, val_windows, len(tokenizer)),
        "wikitext2": _perplexity_record(wiki),
        "samples": sample_texts(model, tokenizer, SAMPLE_PROMPTS, seed=cfg.seed),
    }


def versions() -> dict:
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def publish(directory: Path, metrics: dict, args: argparse.Namespace) -> None:
    """metrics.json and the model card in the checkpoint directory, and the table of all models."""
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (directory / "README.md").write_text(model_card(metrics))
    write_results(args.output_dir, args.results_md)


def reevaluate(directory: Path, corpus, args: argparse.Namespace, cfg: TrainConfig) -> int:
    metrics_path = directory / "metrics.json"
    if not metrics_path.is_file():
        raise SystemExit(f"--reevaluate: no trained checkpoint with metrics.json at {directory}")
    metrics = json.loads(metrics_path.read_text())
    if metrics["train_config"]["seq_len"] != cfg.seq_len:
        raise SystemExit(f"--reevaluate: {directory} was trained with --seq-len {metrics['train_config']['seq_len']}")
    publish(directory, {**metrics, **evaluate_checkpoint(directory, corpus, args, cfg)}, args)
    logger.info(f"{directory.name}: re-evaluated; val ppl {metrics['val']['perplexity']:.2f} before")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    validate_shape(preset)
    cfg = train_config(args)
    name = args.name or f"{args.preset}-gutenberg"
    state_path = args.work_dir / "runs" / name / "state.pt"
    if args.fresh and state_path.exists():
        state_path.unlink()

    corpus = prepare_corpus(args.corpus_dir, args.work_dir, args.vocab_size, args.val_books)
    if args.reevaluate:
        return reevaluate(args.output_dir / name, corpus, args, cfg)
    model = build_model(preset, len(corpus.tokenizer), cfg.seq_len, corpus.tokenizer, cfg.seed).to(args.device)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info(f"{name}: {parameters:,} parameters, {cfg}")
    val_windows = windows(corpus.val_tokens, cfg.seq_len)
    outcome = train(model, corpus.train_tokens, val_windows, cfg, state_path, args.max_minutes, args.stop_at_step)
    if not outcome.finished:
        logger.warning(f"stopped at step {outcome.steps_done} of {cfg.max_steps} ({outcome.stop_reason}); "
                       "exporting it; rerun the command without --stop-at-step/--max-minutes to continue")

    directory = args.output_dir / name
    save_checkpoint(model, corpus.tokenizer, directory, SAVE_DTYPES[args.save_dtype])
    metrics = {
        "name": name,
        "preset": args.preset,
        "parameters": parameters,
        "shape": preset.model_shape(),
        "vocab_size": len(corpus.tokenizer),
        "special_tokens": {"bos": BOS_TOKEN, "eos": EOS_TOKEN, "pad": PAD_TOKEN},
        "train_config": {**cfg.__dict__},
        "steps_done": outcome.steps_done,
        "finished": outcome.finished,
        "stop_reason": outcome.stop_reason,
        "tokens_seen": outcome.steps_done * cfg.batch_size * cfg.seq_len,
        "train_tokens_available": len(corpus.train_tokens),
        "train_minutes": outcome.train_seconds / 60,
        "history": outcome.history,
        "val_books": args.val_books,
        "save_dtype": args.save_dtype,
        "threads": args.threads,
        "device": str(model.device),
        "versions": versions(),
        "command": shlex.join(["python", "benchmarks/train_models.py", *(sys.argv[1:] if argv is None else argv)]),
        **evaluate_checkpoint(directory, corpus, args, cfg),
    }
    publish(directory, metrics, args)
    logger.info(f"{name}: val ppl {metrics['val']['perplexity']:.2f} (unigram {metrics['unigram_val_perplexity']:.1f}), "
                f"WikiText-2 ppl {metrics['wikitext2']['perplexity']:.2f}; saved to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
