"""Why ``learned`` chooses permutations end to end: the evidence, on the embedded stories260K model.

For each calibration set (seeds ``--seeds``, same held-out text as ``benchmarks/run.py``), Wanda 2:4
alone, with the greedy permutation at three solver seeds, with ``learned`` restricted to its layer-wise
objective (``end_to_end: false``) and with the shipped ``learned``. Per row: held-out perplexity, KL to
dense on the held-out text and on calibration-domain text (the first 32 calibration samples), and the
mean per-Linear reconstruction error. Finally the Spearman correlation, over every pruned row, between
KL on calibration text and KL on held-out text: whether the calibration loss ranks permutations the way
held-out text does.

    python benchmarks/ablations.py            # about 10 minutes on one core

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

VARIANTS = [
    Variant("wanda", "none"),
    *(Variant("wanda", "greedy", modifier_args=(("seed", seed),)) for seed in (0, 1, 2)),
    Variant("wanda", "learned", modifier_args=(("end_to_end", False),)),
    Variant("wanda", "learned"),
]
CALIBRATION_KL_SAMPLES = 32


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
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
        for variant in VARIANTS:
            result = comparison.run(variant)
            pruned = load_model(comparison.checkpoint_dir(variant))
            calibration_kl = kl_divergence(comparison.dense, pruned, comparison.tokenizer, calibration_text, 256, 16).kl
            rows.append({"seed": seed, "name": variant.name, "held_out_ppl": result.ppl["held-out"],
                         "held_out_kl": result.kl_to_dense, "calibration_kl": calibration_kl,
                         "layer_error": result.mean_layer_error})
            print(json.dumps(rows[-1]), flush=True)
    pruned_rows = [r for r in rows if r["name"] != "Wanda 2:4"]
    rho = spearmanr([r["calibration_kl"] for r in pruned_rows], [r["held_out_kl"] for r in pruned_rows]).statistic
    write(rows, rho, args, revision, time.perf_counter() - started)
    return 0


def write(rows: list[dict], rho: float, args, revision: str, seconds: float) -> None:
    names = list(dict.fromkeys(r["name"] for r in rows))
    value = {(r["name"], r["seed"]): r for r in rows}
    header = "| variant | " + " | ".join(f"held-out ppl (seed {s})" for s in args.seeds) + " | mean | mean layer err |"
    lines = [header, "|" + "---|" * (len(args.seeds) + 3)]
    for name in names:
        ppl = [value[name, s]["held_out_ppl"] for s in args.seeds]
        error = [value[name, s]["layer_error"] for s in args.seeds]
        lines.append(f"| {name} | " + " | ".join(f"{p:.2f}" for p in ppl)
                     + f" | {sum(ppl) / len(ppl):.2f} | {sum(error) / len(error):.4f} |")
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "stories260k.json").write_text(json.dumps({"commit": revision, "seconds": seconds, "spearman": rho,
                                                      "rows": rows}, indent=2) + "\n")
    (out / "stories260k.md").write_text(
        f"# Ablations: stories260K, Wanda 2:4\n\nWritten by `benchmarks/ablations.py` at commit `{revision}` "
        f"({seconds / 60:.1f} min); calibration seeds {args.seeds}, held-out text as in `benchmarks/run.py`.\n\n"
        + "\n".join(lines)
        + f"\n\nSpearman correlation of KL to dense on calibration text vs on held-out text over the "
        f"{len(rows) - len(args.seeds)} pruned-and-permuted rows: {rho:.3f}.\n")
    print("\n".join(lines) + f"\nspearman {rho:.3f}")


if __name__ == "__main__":
    sys.exit(main())
