"""How unevenly the dense model's loss weighs each Linear's output rows, on SmolLM2-135M.

``plugin/sensitivity.py`` gives every output row of a Linear its empirical Fisher information (the squared
gradient of the calibration cross-entropy at that output, summed over tokens); ``residual_weighting`` and
``layer_weighting: fisher`` weight each row's pruning error by it. Where the weights are nearly even the
weighting barely moves a solver's objective; where a few rows carry most of it, it decides the solve.
Per projection, over the decoder layers: the effective number of rows ``(sum F)^2 / sum F^2`` as a share of
the rows (1: all alike; 1/rows: one row carries all), and the largest row's weight over the median row's.

    python benchmarks/sensitivity_spread.py --threads 2     # about a minute on 2 cores

Writes ``results/ablations/sensitivity_spread_smollm2.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import load_model  # noqa: E402
from residual_signal import add_calibration_arguments, smollm2_calibration  # noqa: E402
from run import REPO, source_revision  # noqa: E402

from learned_permutation.plugin.search import SCORING_TOKENS  # noqa: E402
from learned_permutation.plugin.selection import calibration_sample, leading_rows  # noqa: E402
from learned_permutation.plugin.sensitivity import output_row_fisher  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def effective_share(weights: torch.Tensor) -> float:
    """``(sum w)^2 / sum w^2`` over the number of rows."""
    return float(weights.sum() ** 2 / weights.square().sum()) / weights.numel()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_calibration_arguments(parser)
    parser.add_argument("--output", type=Path, default=REPO / "results" / "ablations" / "sensitivity_spread_smollm2.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    model_dir, _, full, _ = smollm2_calibration(args.num_samples, args.seq_len, args.seed)
    model = load_model(model_dir)
    scored = leading_rows(calibration_sample([full], 8192), SCORING_TOKENS)[0]  # the modifier's sweep rows
    layers = model.get_decoder().layers
    by_projection: dict[str, list] = {projection: [] for projection in PROJECTIONS}
    modules = []  # per decoder layer, as the sweep takes them
    for layer in layers:
        modules.append([])
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                modules[-1].append(module)
                by_projection[name.rsplit(".", 1)[-1]].append(module)
    fisher = output_row_fisher(model, scored, modules, "cpu")
    command = "python benchmarks/sensitivity_spread.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# How unevenly the loss weighs each projection's output rows (SmolLM2-135M, empirical Fisher)", "",
        f"Written by `{command}` at `{source_revision()}` in {time.time() - started:.0f} s: the sweep of "
        f"`plugin/sensitivity.py` on the first {SCORING_TOKENS} tokens of the modifier's sample (calibration seed "
        f"{args.seed}). Effective rows: `(sum F)^2 / sum F^2` as a share of the rows, for the error weights `F` "
        "and for the row scales `sqrt F` the solvers see; median over the layers (lowest, highest).", "",
        "| projection | rows | effective rows, F | effective rows, sqrt F | largest / median row F |",
        "|---|---|---|---|---|",
    ]
    for projection in PROJECTIONS:
        found = [fisher[module] for module in by_projection[projection]]
        shares = [effective_share(f) for f in found]
        roots = [effective_share(f.sqrt()) for f in found]
        ratios = [float(f.max() / f.median()) for f in found]
        lines.append(f"| {projection} | {found[0].numel()} | {statistics.median(shares):.2f} ({min(shares):.2f}-{max(shares):.2f}) | "
                     f"{statistics.median(roots):.2f} ({min(roots):.2f}-{max(roots):.2f}) | "
                     f"{statistics.median(ratios):.0f} ({min(ratios):.0f}-{max(ratios):.0f}) |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
