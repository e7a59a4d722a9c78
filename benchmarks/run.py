"""Side-by-side benchmark: dense, and each pruner (Wanda, SparseGPT) x permutation method (none, ria,
greedy, learned) x pattern (2:4, 4:8), on one model per run, in one process.

For every variant: real ``oneshot`` on a fresh copy, the saved checkpoint evaluated for token perplexity
on in-domain held-out text and on WikiText-2 validation, KL(dense || variant) on the held-out text,
per-Linear reconstruction error against the dense weights in the checkpoint's channel order, the
permutation modifier's time and the whole oneshot's; lm-eval's WikiText word perplexity for the headline
rows (dense, and each pruner at 2:4 without and with learned permutations). A pattern the model's shapes
cannot take (4:8 when an input dimension is not a multiple of 8) is listed as skipped, with the reason.

Writes ``<output-dir>/<model>/results.md``, ``results.json``, ``perplexity.png`` and ``layer_errors.png``.
With ``--repeats K`` the whole grid runs again for calibration seeds ``seed+1 .. seed+K-1`` (same held-out
text), and a table of mean and spread over the K calibration sets is added: on small models the choice
of permutation moves perplexity by more than the methods differ, so one calibration set is not enough to
rank them.

    python benchmarks/run.py                          # the embedded stories260K model
    python benchmarks/run.py --repeats 3              # ... over three calibration sets
    python benchmarks/run.py --model llama-2m-gutenberg
    python benchmarks/run.py --model path/to/checkpoint --calibration text.txt --held-out val.txt
    python benchmarks/run.py --model smollm2-135m     # the real model: benchmarks/real_model.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from loguru import logger  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from comparison import (  # noqa: E402
    PERMUTATION_METHODS,
    PRUNER_LABELS,
    Comparison,
    EvalTexts,
    Result,
    Variant,
    fill_gap_closed,
    load_model,
    results_table,
    variant_grid,
)
from learned_permutation.tools.data import (  # noqa: E402
    file_dataset,
    sample_text_dataset,
    shared_data_dir,
    split_paragraphs,
)
from learned_permutation.tools.evaluation import wikitext_eval_text  # noqa: E402
from learned_permutation.tools.llama2c import EMBEDDED_MODEL_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import real_model  # noqa: E402
from repeats import seed_summary, seed_summary_table  # noqa: E402
from training.corpus import load_books, split_books  # noqa: E402

HEADLINE = {("none", "2:4"), ("learned", "2:4")}


@dataclass(frozen=True)
class Setup:
    """A model with its calibration rows, held-out text and evaluation window length."""

    name: str
    model_dir: Path
    calibration: Dataset
    held_out: str
    eval_seq_len: int
    description: str


def model_samples_setup(name: str, model_dir: Path, args, seed: int) -> Setup:
    """In-domain text sampled from the dense model itself: calibration with ``seed``, held-out with
    --seed + 1000 (the same for every repeat)."""
    dense, tokenizer = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    context = dense.config.max_position_embeddings
    calibration = sample_text_dataset(dense, tokenizer, args.num_samples, args.seq_len, seed=seed,
                                      batch_size=args.num_samples)
    held_out = sample_text_dataset(dense, tokenizer, args.held_out_samples, context, seed=args.seed + 1000,
                                   batch_size=args.held_out_samples)
    return Setup(name, model_dir, calibration, "\n".join(held_out["text"]), context,
                 f"calibration: {args.num_samples} samples of {args.seq_len} tokens drawn from the dense model "
                 f"(seed {seed}); held-out: {args.held_out_samples} samples of {context} tokens "
                 f"(seed {args.seed + 1000})")


def gutenberg_setup(name: str, model_dir: Path, args, seed: int) -> Setup:
    """The training script's book split: calibration paragraphs from training books, held-out = the
    validation books the model never saw (the first --held-out-chars characters of them)."""
    metrics = json.loads((model_dir / "metrics.json").read_text())
    train_books, val_books = split_books(load_books(shared_data_dir() / "corpus"), metrics["val_books"])
    paragraphs = split_paragraphs("\n\n".join(train_books[:20]), min_chars=2000)
    rows = Dataset.from_dict({"text": paragraphs}).shuffle(seed=seed).select(range(args.num_samples))
    held_out = "\n\n".join(val_books)[: args.held_out_chars]
    context = load_model(model_dir).config.max_position_embeddings
    return Setup(name, model_dir, rows, held_out, context,
                 f"calibration: {args.num_samples} paragraphs (~2000 chars, truncated to {args.seq_len} tokens) of "
                 f"training books (seed {seed}); held-out: first {args.held_out_chars:,} characters of the "
                 f"{metrics['val_books']} validation books")


def custom_setup(model_dir: Path, args, seed: int) -> Setup:
    if args.calibration is None or args.held_out is None:
        raise SystemExit("a model directory needs --calibration (text or parquet file) and --held-out (text file)")
    rows = file_dataset(args.calibration).shuffle(seed=seed)
    if len(rows) < args.num_samples:
        raise SystemExit(f"{args.calibration} has {len(rows)} rows, fewer than --num-samples {args.num_samples}")
    context = load_model(model_dir).config.max_position_embeddings
    held_out = Path(args.held_out).read_text(encoding="utf-8")[: args.held_out_chars]
    return Setup(model_dir.name, model_dir, rows.select(range(args.num_samples)), held_out, min(context, 2048),
                 f"calibration: {args.num_samples} rows of {args.calibration}; held-out: {args.held_out}")


def build_setup(args, seed: int) -> Setup:
    """The model and its texts; ``seed`` picks the calibration rows."""
    if args.model == "embedded":
        return model_samples_setup("stories260k", EMBEDDED_MODEL_DIR, args, seed)
    if args.model == "llama-2m-gutenberg":
        return gutenberg_setup(args.model, REPO / "models" / args.model, args, seed)
    return custom_setup(Path(args.model), args, seed)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded",
                        help="embedded (stories260K), llama-2m-gutenberg, smollm2-135m, or a checkpoint directory")
    parser.add_argument("--calibration", help="text/parquet file (only with a checkpoint directory)")
    parser.add_argument("--held-out", help="held-out text file (only with a checkpoint directory)")
    parser.add_argument("--pruners", nargs="+", default=list(PRUNER_LABELS), choices=list(PRUNER_LABELS))
    parser.add_argument("--methods", nargs="+", default=list(PERMUTATION_METHODS), choices=PERMUTATION_METHODS)
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8"])
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256, help="calibration tokens per sample")
    parser.add_argument("--held-out-samples", type=int, default=32, help="model-sampled held-out texts")
    parser.add_argument("--held-out-chars", type=int, default=400_000, help="held-out text cut to this length")
    parser.add_argument("--wikitext-windows", type=int, default=128, help="WikiText-2 windows for token ppl (0: all)")
    parser.add_argument("--layer-error-windows", type=int, default=16,
                        help="held-out windows on which per-Linear reconstruction error is measured")
    parser.add_argument("--lm-eval", choices=["none", "headline", "all"], default="headline",
                        help="rows that also get lm-eval's wikitext word perplexity (whole validation file)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "results" / "benchmarks")
    parser.add_argument("--checkpoint-dir", type=Path, default=REPO / "outputs" / "benchmarks")
    parser.add_argument("--seed", type=int, default=0, help="calibration seed of the main table")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the grid for this many calibration seeds (--seed, --seed+1, ...) and add mean/spread")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--solver-seed", type=int, default=0,
                        help="the modifier's seed (its random row samples and windows) in every permuting row")
    real_model.add_arguments(parser)
    return parser.parse_args(argv)


def wants_lm_eval(variant: Variant, mode: str) -> bool:
    return mode == "all" or (mode == "headline" and (variant.pruner is None or (variant.method, variant.pattern) in HEADLINE))


def plot_perplexity(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results[0].ppl)
    groups = sorted({(r.pruner, r.pattern) for r in results if r.pruner and not r.skipped}, key=str)
    methods = [m for m in PERMUTATION_METHODS if any(r.method == m and r.pruner for r in results)]
    fig, axes = plt.subplots(1, len(labels), figsize=(6 * len(labels), 4), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, label in zip(axes[0], labels):
        for i, method in enumerate(methods):
            values = [next((r.ppl[label] for r in results if (r.pruner, r.pattern, r.method) == (*g, method)
                            and not r.skipped), float("nan")) for g in groups]
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=method)
        ax.axhline(results[0].ppl[label], color="black", linestyle="--", label="dense")
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(groups))],
                      [f"{PRUNER_LABELS[p]} {pat}" for p, pat in groups])
        ax.set_ylabel(f"perplexity ({label})")
        ax.legend(title="permutation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def per_layer(errors: dict[str, float]) -> dict[int, float]:
    """Mean reconstruction error of each decoder layer's Linears (names ``...layers.<i>....``)."""
    sums: dict[int, list[float]] = {}
    for name, value in errors.items():
        parts = name.split(".")
        index = int(parts[parts.index("layers") + 1])
        sums.setdefault(index, []).append(value)
    return {index: sum(values) / len(values) for index, values in sorted(sums.items())}


def plot_layer_errors(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    baselines = {(r.pruner, r.pattern): per_layer(r.layer_errors) for r in results
                 if r.method == "none" and r.layer_errors}
    groups = sorted(baselines, key=str)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        base = baselines[group]
        for r in results:
            if (r.pruner, r.pattern) == group and r.method != "none" and r.layer_errors:
                layers = per_layer(r.layer_errors)
                ax.plot(list(layers), [100 * (1 - layers[i] / base[i]) for i in layers], marker="o", label=r.method)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{PRUNER_LABELS[group[0]]} {group[1]}")
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(title="permutation")
    axes[0][0].set_ylabel("layer error reduction vs no permutation (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def source_revision() -> str:
    """The commit the code ran from, marked ``+changes`` when the working tree differs from it."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "src", "benchmarks") else "")


def write_markdown(
    results: list[Result], setup: Setup, args, seconds: float, path: Path, summary: list[dict], revision: str
) -> None:
    lm_rows = [r for r in results if r.lm_eval]
    lm_table = "\n".join(
        [
            "| method | word ppl | byte ppl | bits per byte |",
            "|---|---|---|---|",
            *(f"| {r.name} | {r.lm_eval['word_perplexity']:.2f} | {r.lm_eval['byte_perplexity']:.4f} | "
              f"{r.lm_eval['bits_per_byte']:.4f} |" for r in lm_rows),
        ]
    )
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    repeated = (
        f"\n\nOver {args.repeats} calibration sets (seeds {args.seed} to {args.seed + args.repeats - 1}; the table "
        f"above is seed {args.seed}), same held-out text; mean ± standard deviation:\n\n{seed_summary_table(summary)}"
        if summary else ""
    )
    path.write_text(
        f"""# Benchmark: {setup.name}

Written by `benchmarks/run.py`; do not edit by hand. {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC,
{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; whole run
{seconds / 60:.1f} min. Command: `{command.strip()}` at commit `{revision}`.

Model: `{setup.model_dir.relative_to(REPO) if setup.model_dir.is_relative_to(REPO) else setup.model_dir}`.
{setup.description}. Token perplexity in windows of {setup.eval_seq_len} tokens ([BOS] + {setup.eval_seq_len - 1}
text tokens, non-overlapping); wikitext2: the first {args.wikitext_windows or 'all'} windows of the validation
file. KL(dense || variant) per predicted token on the held-out text. *gap closed*: share of the same pruner's
unpermuted perplexity gap to dense that the permutation closes. *layer err*: mean over pruned Linears of
`||X (W_dense - W)^T||^2 / ||X W_dense^T||^2` on the held-out text, X the dense model's inputs (first
{args.layer_error_windows} windows), dense weights in the checkpoint's channel order. *perm s*: the
permutation modifier's own time; *oneshot s*: the whole `oneshot` call (calibration passes, modifiers, save).

{results_table(results, markdown=True)}{repeated}

lm-eval `wikitext` (offline task `wikitext_local`, whole validation file, word perplexity as lm-eval
defines it):

{lm_table if lm_rows else "(not run)"}

Plots: `perplexity.png` (perplexity per method), `layer_errors.png` (per-layer error reduction relative to
the same pruner without permutation).
"""
    )


def run_grid(args, seed: int, wikitext: Path) -> tuple[Setup, list[Result]]:
    """Every variant on the calibration set of ``seed``; lm-eval only for the main seed."""
    setup = build_setup(args, seed)
    extra = {"wikitext2": wikitext_eval_text(wikitext)} if wikitext.is_file() else {}
    texts = EvalTexts(setup.held_out, extra, {"wikitext2": args.wikitext_windows or None})
    comparison = Comparison(setup.model_dir, setup.calibration, args.seq_len, texts,
                            args.checkpoint_dir / setup.name, setup.eval_seq_len, seed=seed,
                            layer_error_windows=args.layer_error_windows)
    results = []
    solver_seed = (("seed", args.solver_seed),) if args.solver_seed else ()
    for variant in variant_grid(args.pruners, args.methods, args.patterns, solver_seed):
        logger.info(f"benchmark (calibration seed {seed}): {variant.name}")
        lm_eval = wikitext.is_file() and seed == args.seed and wants_lm_eval(variant, args.lm_eval)
        results.append(comparison.run(variant, wikitext if lm_eval else None))
    fill_gap_closed(results)
    return setup, results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model == real_model.NAME:
        return real_model.main(args)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    started, revision = time.perf_counter(), source_revision()  # the code that runs, not what HEAD is at the end
    wikitext = shared_data_dir() / "wikitext2" / "wiki.valid.raw"
    setup, results = run_grid(args, args.seed, wikitext)
    repeats = {args.seed: results}
    for seed in range(args.seed + 1, args.seed + args.repeats):
        repeats[seed] = run_grid(args, seed, wikitext)[1]
    summary = seed_summary(repeats) if args.repeats > 1 else []
    seconds = time.perf_counter() - started

    out = args.output_dir / setup.name
    out.mkdir(parents=True, exist_ok=True)
    print(f"\n{setup.name}: {setup.description}")
    print(results_table(results))
    if summary:
        print(f"\nover calibration seeds {list(repeats)}:\n" + seed_summary_table(summary))
    (out / "results.json").write_text(json.dumps(
        {"model": setup.name, "setup": setup.description, "seconds": seconds, "commit": revision,
         "results": [r.to_json() for r in results],
         "repeats": {str(seed): [r.to_json() for r in rows] for seed, rows in repeats.items()} if summary else {},
         "seed_summary": summary}, indent=2) + "\n")
    write_markdown(results, setup, args, seconds, out / "results.md", summary, revision)
    plot_perplexity(results, out / "perplexity.png")
    plot_layer_errors(results, out / "layer_errors.png")
    print(f"\nwrote {out}/results.md, results.json, perplexity.png, layer_errors.png; total {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
