"""Which permutation method to ship, and why: the ablation on the embedded stories260K model.

For each calibration set (seeds ``--seeds``, same held-out text as ``benchmarks/run.py``) and each pruner
(``--pruners``, 2:4): the pruner alone; ``ria`` and ``greedy``; the default ``select`` (the whole configuration
of the candidate solver whose simulated pruning is closest to the dense model; the committed table predates
that and shows the per-site choice of its time); ``select`` with the learned solver among its candidates;
and the learned solver's stages on the layer-wise objective: its heuristic start alone (no learning, no
polish), + swap polish, + Sinkhorn learning, + both (the solver's default). Per row: held-out perplexity,
KL to dense on the held-out text and on calibration-domain text (the first 32 calibration samples), the
mean per-Linear reconstruction error. Finally the Spearman correlations, over every permuted row, of
held-out KL with calibration KL and with the mean per-Linear error: how well each ranks permutations.

    python benchmarks/ablations.py                       # Wanda and SparseGPT, 3 seeds: about 40 minutes on 2 cores

Writes ``results/ablations/stories260k.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO, build_setup, source_revision  # noqa: E402

from comparison import Comparison, EvalTexts, Variant, load_model  # noqa: E402
from learned_permutation.tools.evaluation import kl_divergence  # noqa: E402

LEARNED_STAGES = {  # solver_args of the learned solver for each stage of its ablation
    "start": {"rounds": 0},
    "polish": {"steps": 0},
    "learning": {"polish": False},
    "learning+polish": {},
}


def variants(pruner: str) -> list[Variant]:
    return [
        Variant(pruner, "none"),
        Variant(pruner, "ria"),
        Variant(pruner, "greedy"),
        Variant(pruner, "select"),
        Variant(pruner, "select", modifier_args=(("candidates", ("identity", "ria", "greedy", "learned")),)),
        *(Variant(pruner, "learned", modifier_args=(("solver_args", knobs),)) for knobs in LEARNED_STAGES.values()),
    ]


CALIBRATION_KL_SAMPLES = 32


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    parser.add_argument("--pruners", nargs="+", default=["wanda", "sparsegpt"], choices=["wanda", "sparsegpt"])
    parser.add_argument("--output-dir", type=Path, default=REPO / "results" / "ablations")
    parser.add_argument("--checkpoint-dir", type=Path, default=REPO / "outputs" / "ablations")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started, revision = time.perf_counter(), source_revision()
    setup_args = argparse.Namespace(model="embedded", num_samples=128, seq_len=256, held_out_samples=32, seed=0)
    rows = []
    for seed in args.seeds:
        setup = build_setup(setup_args, seed)
        comparison = Comparison(setup.model_dir, setup.calibration, 256, EvalTexts(setup.held_out),
                                args.checkpoint_dir, setup.eval_seq_len, seed=seed, layer_error_windows=4)
        calibration_text = "\n".join(setup.calibration["text"][:CALIBRATION_KL_SAMPLES])
        for variant in [v for pruner in args.pruners for v in variants(pruner)]:
            result = comparison.run(variant)
            pruned = load_model(comparison.checkpoint_dir(variant))
            calibration_kl = kl_divergence(comparison.dense, pruned, comparison.tokenizer, calibration_text, 256, 16).kl
            rows.append({"seed": seed, "name": variant.name, "pruner": variant.pruner, "method": variant.method,
                         "held_out_ppl": result.ppl["held-out"], "seconds": result.permutation_seconds,
                         "held_out_kl": result.kl_to_dense, "calibration_kl": calibration_kl,
                         "layer_error": result.mean_layer_error})
            print(json.dumps(rows[-1]), flush=True)
    permuted = [r for r in rows if r["method"] != "none"]
    held_out = [r["held_out_kl"] for r in permuted]
    rho = {
        "calibration KL": spearmanr([r["calibration_kl"] for r in permuted], held_out).statistic,
        "mean per-Linear error": spearmanr([r["layer_error"] for r in permuted], held_out).statistic,
    }
    write(rows, rho, args, revision, time.perf_counter() - started)
    return 0


def write(rows: list[dict], rho: dict[str, float], args, revision: str, seconds: float) -> None:
    names = list(dict.fromkeys(r["name"] for r in rows))
    value = {(r["name"], r["seed"]): r for r in rows}
    header = ("| variant | " + " | ".join(f"held-out ppl (seed {s})" for s in args.seeds)
              + " | mean ppl | mean held-out KL | mean layer err | mean modifier s |")
    lines = [header, "|" + "---|" * (len(args.seeds) + 5)]
    for name in names:
        picked = [value[name, s] for s in args.seeds]
        ppl = [r["held_out_ppl"] for r in picked]
        lines.append(f"| {name} | " + " | ".join(f"{p:.2f}" for p in ppl) + f" | {mean(ppl):.2f} | "
                     f"{mean([r['held_out_kl'] for r in picked]):.4f} | {mean([r['layer_error'] for r in picked]):.4f} | "
                     f"{mean([r['seconds'] or 0.0 for r in picked]):.1f} |")
    correlations = "; ".join(f"{name}: {value:.3f}" for name, value in rho.items())
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "stories260k.json").write_text(json.dumps({"commit": revision, "seconds": seconds, "spearman": rho,
                                                      "rows": rows}, indent=2) + "\n")
    (out / "stories260k.md").write_text(
        f"# Ablations: stories260K, 2:4\n\nWritten by `benchmarks/ablations.py {' '.join(sys.argv[1:])}` at commit "
        f"`{revision}` ({seconds / 60:.1f} min); calibration seeds {args.seeds}, held-out text as in "
        "`benchmarks/run.py`. Learned-solver stages (layer-wise objective only): `{'rounds': 0}` = its heuristic start, "
        "`{'steps': 0}` = + swap polish, `{'polish': False}` = + Sinkhorn learning, `{}` = both (the solver's default).\n\n"
        + "\n".join(lines)
        + f"\n\nSpearman correlation with held-out KL over the {len([r for r in rows if r['method'] != 'none'])} "
        f"permuted rows: {correlations}.\n")
    print("\n".join(lines) + f"\nspearman {correlations}")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


if __name__ == "__main__":
    sys.exit(main())
