"""End-to-end demo: 2:4 pruning of the bundled stories260K model with llm-compressor, side by side.

For every method in `METHODS` (a recipe, or none for the dense model) it runs ``oneshot`` on a fresh copy
of the model with the same calibration text, saves the checkpoint under ``outputs/demo/<slug>/``, checks
that every pruned Linear is exactly 2:4 in storage order, and reports:

* perplexity on held-out text sampled from the dense model (another seed than the calibration text:
  stories260K only knows children's stories, so this is its in-domain test set);
* perplexity on the first ``--wikitext-windows`` windows of WikiText-2 validation, when ``../shared/data``
  holds it (out of domain for this model; the whole file is 1413 windows, 30-100 s per model on 2 cores);
* KL(dense || method) of next-token distributions on the held-out text (damage, whatever the domain).

Add a method by appending to `METHODS`. Runs offline on a CPU in well under a minute.

    python examples/demo.py [--output-dir outputs/demo] [--num-samples 128] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from learned_permutation import REPORT_FILE  # noqa: E402  (also registers the modifier)
from learned_permutation.integration.compress import compress  # noqa: E402
from learned_permutation.integration.data import sample_text_dataset  # noqa: E402
from learned_permutation.integration.evaluation import (  # noqa: E402
    check_nm_sparsity,
    kl_divergence,
    perplexity,
    wikitext_eval_text,
)
from learned_permutation.integration.llama2c import EMBEDDED_MODEL_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
EVAL_SEQ_LEN = 512  # stories260K's whole context
EVAL_BATCH = 32
HELD_OUT_SEED = 1_000  # calibration uses --seed; the held-out text another seed


@dataclass(frozen=True)
class Method:
    name: str
    recipe: Path | None  # None: the dense model, unchanged
    pipeline: str = "independent"
    baseline: str | None = None  # the same pruner without permutation: the gap this row closes


METHODS = [
    Method("dense", None),
    Method("Wanda 2:4", RECIPES / "wanda_2of4.yaml"),
    Method("Wanda 2:4 + learned perm", RECIPES / "wanda_2of4_learned.yaml", baseline="Wanda 2:4"),
    Method("SparseGPT 2:4", RECIPES / "sparsegpt_2of4.yaml"),
    Method("SparseGPT 2:4 + learned perm", RECIPES / "sparsegpt_2of4_learned.yaml", baseline="SparseGPT 2:4"),
]


@dataclass
class Row:
    method: str
    ppl: dict[str, float] = field(default_factory=dict)
    kl_to_dense: float = 0.0
    exact_2of4: bool | None = None  # None for the dense model
    seconds: float = 0.0
    permutation_seconds: float | None = None  # the modifier's own time, from permutation_report.json
    gap_closed: float | None = None  # share of the baseline-to-dense held-out perplexity gap closed


def shared_wikitext() -> Path | None:
    base = os.environ.get("LEARNED_PERMUTATION_SHARED_DATA")
    path = (Path(base) if base else REPO.parent / "shared" / "data") / "wikitext2" / "wiki.valid.raw"
    return path if path.is_file() else None


def load_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass(frozen=True)
class EvalSets:
    held_out: str
    wikitext: str | None  # None when the shared data is absent
    wikitext_windows: int | None  # None: the whole file


def evaluate(method: Method, model, dense, tokenizer, sets: EvalSets) -> Row:
    """Held-out perplexity and KL come from the same two forward passes (dense and method)."""
    row = Row(method.name)
    in_domain = kl_divergence(dense, model, tokenizer, sets.held_out, EVAL_SEQ_LEN, EVAL_BATCH)
    row.ppl["held-out"], row.kl_to_dense = in_domain.model.ppl, in_domain.kl
    if sets.wikitext is not None:
        wikitext = perplexity(model, tokenizer, sets.wikitext, EVAL_SEQ_LEN, EVAL_BATCH, sets.wikitext_windows)
        row.ppl["wikitext2"] = wikitext.ppl
    if method.recipe is not None:
        report = check_nm_sparsity(model, 2, 4, ignore=["re:.*lm_head"])
        if not report.ok:
            raise SystemExit(f"{method.name}: not exactly 2:4 in storage order: {report.failures}")
        row.exact_2of4 = True
    return row


def run_method(method: Method, calibration, tokenizer, dense, sets: EvalSets, args) -> Row:
    start = time.perf_counter()
    model = load_model(EMBEDDED_MODEL_DIR)
    if method.recipe is not None:
        torch.manual_seed(args.seed)
        output_dir = args.output_dir / slug(method.name)
        shutil.rmtree(output_dir, ignore_errors=True)  # this demo's own output from an earlier run
        compress(model, tokenizer, str(method.recipe), calibration, args.seq_len, output_dir, method.pipeline)
        model = load_model(output_dir)  # evaluate what was saved, not the in-memory object
    row = evaluate(method, model, dense, tokenizer, sets)
    if method.recipe is not None and (output_dir / REPORT_FILE).is_file():
        row.permutation_seconds = json.loads((output_dir / REPORT_FILE).read_text())["total_seconds"]
    row.seconds = time.perf_counter() - start
    return row


def fill_gap_closed(rows: list[Row]) -> None:
    """Share of the pruner's held-out perplexity gap to dense that the permutation closes."""
    by_name = {row.method: row for row in rows}
    dense = by_name["dense"].ppl["held-out"]
    for method, row in zip(METHODS, rows):
        if method.baseline is not None:
            base = by_name[method.baseline].ppl["held-out"]
            row.gap_closed = (base - row.ppl["held-out"]) / (base - dense)


def format_table(rows: list[Row]) -> str:
    labels = list(rows[0].ppl)
    header = ["method", *(f"ppl {label}" for label in labels), "KL to dense", "gap closed", "exact 2:4",
              "perm s", "total s"]
    lines = [header]
    for row in rows:
        exact = "-" if row.exact_2of4 is None else ("yes" if row.exact_2of4 else "NO")
        gap = "-" if row.gap_closed is None else f"{100 * row.gap_closed:.1f}%"
        perm = "-" if row.permutation_seconds is None else f"{row.permutation_seconds:.1f}"
        lines.append([row.method, *(f"{row.ppl[label]:.3f}" for label in labels), f"{row.kl_to_dense:.4f}",
                      gap, exact, perm, f"{row.seconds:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines)


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    dense = load_model(EMBEDDED_MODEL_DIR)
    calibration = sample_text_dataset(
        dense, tokenizer, args.num_samples, args.seq_len, seed=args.seed, batch_size=args.num_samples
    )
    held_out = sample_text_dataset(
        dense, tokenizer, args.held_out_samples, EVAL_SEQ_LEN, seed=HELD_OUT_SEED, batch_size=args.held_out_samples
    )
    wikitext = shared_wikitext()
    sets = EvalSets(
        held_out="\n".join(held_out["text"]),
        wikitext=None if wikitext is None else wikitext_eval_text(wikitext),
        wikitext_windows=args.wikitext_windows or None,
    )

    rows = [run_method(method, calibration, tokenizer, dense, sets, args) for method in METHODS]
    fill_gap_closed(rows)

    print(f"\nstories260K; calibration: {args.num_samples} model samples x {args.seq_len} tokens (seed {args.seed}); "
          f"held-out: {args.held_out_samples} model samples x {EVAL_SEQ_LEN} tokens (seed {HELD_OUT_SEED}); "
          f"evaluation windows of {EVAL_SEQ_LEN} tokens, wikitext2: "
          f"{'all' if not args.wikitext_windows else f'first {args.wikitext_windows}'} windows of the validation file")
    print(format_table(rows))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    print(f"\nresults in {args.output_dir / 'results.json'}; total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
