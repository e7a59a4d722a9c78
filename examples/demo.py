"""The main job: 2:4 pruning of the bundled stories260K model with llm-compressor, without and with
channel permutations (the default method, select), side by side.

Runs the shipped recipes (Wanda 2:4 and SparseGPT 2:4, each alone and after
``LearnedPermutationModifier``) with real ``oneshot`` on fresh copies of the model, the same calibration
text for all, saves each checkpoint under ``outputs/demo/<slug>/``, checks every pruned Linear is exactly
2:4 in storage order, and prints for each:

* perplexity on held-out text sampled from the dense model with another seed than the calibration text
  (stories260K only knows children's stories: this is its in-domain test set), and KL(dense || pruned)
  of next-token distributions on it;
* perplexity on the first ``--wikitext-windows`` windows of WikiText-2 validation when ``../shared/data``
  holds it (out of domain for this model, but the standard);
* the share of the pruner's perplexity gap to dense that the permutation closes, the mean per-Linear
  reconstruction error, the modifier's own time and the whole oneshot's.

    python examples/demo.py [--output-dir outputs/demo] [--num-samples 128] [--seq-len 256]

The full grid (RIA/greedy/learned/select, 4:8, other models, lm-eval, plots) is ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VERBOSE = "--verbose" in sys.argv  # decided before the imports: quieting must precede them
if not VERBOSE:
    from learned_permutation_cli import quiet_environment

    quiet_environment()

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

# The comparison engine lives with the benchmarks (benchmarks/comparison.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from comparison import (  # noqa: E402
    Comparison,
    EvalTexts,
    Variant,
    fill_gap_closed,
    load_model,
    results_table,
)
from learned_permutation.tools.data import sample_text_dataset, shared_data_dir  # noqa: E402
from learned_permutation.tools.evaluation import wikitext_eval_text  # noqa: E402
from learned_permutation.tools.llama2c import EMBEDDED_MODEL_DIR  # noqa: E402
from learned_permutation.tools.logs import quiet_third_party_logs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
EVAL_SEQ_LEN = 512  # stories260K's whole context
HELD_OUT_SEED = 1_000  # calibration uses --seed; the held-out text another seed

VARIANTS = [
    Variant(),
    Variant("wanda", "none", "2:4", RECIPES / "wanda_2of4.yaml"),
    Variant("wanda", "select", "2:4", RECIPES / "wanda_2of4_permuted.yaml"),
    Variant("sparsegpt", "none", "2:4", RECIPES / "sparsegpt_2of4.yaml"),
    Variant("sparsegpt", "select", "2:4", RECIPES / "sparsegpt_2of4_permuted.yaml"),
]


def shared_wikitext() -> Path | None:
    path = shared_data_dir() / "wikitext2" / "wiki.valid.raw"
    return path if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "demo")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    parser.add_argument("--held-out-samples", type=int, default=32, help="held-out samples of 512 tokens")
    parser.add_argument("--wikitext-windows", type=int, default=64,
                        help="WikiText-2 windows of 512 tokens to evaluate (0: all 1413)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; the model is too small to gain from more, and on a busy "
                        "2-core machine two OpenMP threads made its matmuls up to 400x slower")
    parser.add_argument("--verbose", action="store_true",
                        help="also show llm-compressor's, transformers' and datasets' own logs and progress bars")
    args = parser.parse_args(argv)
    if not args.verbose:
        quiet_third_party_logs()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    dense, tokenizer = load_model(EMBEDDED_MODEL_DIR), AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    calibration = sample_text_dataset(
        dense, tokenizer, args.num_samples, args.seq_len, seed=args.seed, batch_size=args.num_samples
    )
    held_out = sample_text_dataset(
        dense, tokenizer, args.held_out_samples, EVAL_SEQ_LEN, seed=HELD_OUT_SEED, batch_size=args.held_out_samples
    )
    wikitext = shared_wikitext()
    texts = EvalTexts(
        held_out="\n".join(held_out["text"]),
        extra={} if wikitext is None else {"wikitext2": wikitext_eval_text(wikitext)},
        max_windows={"wikitext2": args.wikitext_windows or None},
    )

    comparison = Comparison(EMBEDDED_MODEL_DIR, calibration, args.seq_len, texts, args.output_dir, EVAL_SEQ_LEN,
                            seed=args.seed, dense=dense, tokenizer=tokenizer)
    results = [comparison.run(variant) for variant in VARIANTS]
    fill_gap_closed(results)

    print(f"\nstories260K; calibration: {args.num_samples} model samples x {args.seq_len} tokens (seed {args.seed}); "
          f"held-out: {args.held_out_samples} model samples x {EVAL_SEQ_LEN} tokens (seed {HELD_OUT_SEED}); "
          f"evaluation windows of {EVAL_SEQ_LEN} tokens, wikitext2: "
          f"{'all' if not args.wikitext_windows else f'first {args.wikitext_windows}'} windows of the validation file")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    print(f"results in {args.output_dir / 'results.json'}; total {time.perf_counter() - started:.1f} s\n")
    print(results_table(results))  # last, so it is what the screen shows when the demo ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
