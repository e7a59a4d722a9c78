"""Which part of a saved permutation makes the difference: its residual site or its per-layer sites.

Two benchmark checkpoints (``benchmarks/run.py`` keeps them under ``outputs/benchmarks/``) each saved
the permutations they folded. Their residual and per-layer permutations are recombined on the dense
SmolLM2-135M, every Linear is masked as Wanda 2:4 would mask it (energies of the 32 x 512 C4
calibration set; no weight update), and each combination is measured by the KL to dense on the
modifier's calibration sample (what ``select`` can see) and on held-out C4 (what users see).

    python benchmarks/site_attribution.py outputs/benchmarks/smollm2-135m/wanda_2_4_greedy_perm \\
        outputs/benchmarks/smollm2-135m/wanda_2_4_select_perm

Writes ``results/ablations/site_attribution_smollm2.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import load_model  # noqa: E402
from residual_signal import calibration_losses, energies, mask_model, smollm2_calibration  # noqa: E402
from run import REPO, source_revision  # noqa: E402

from learned_permutation.plugin.artifacts import PERMUTATIONS_FILE  # noqa: E402
from learned_permutation.plugin.selection import calibration_sample  # noqa: E402
from learned_permutation.structure import find_sites, fold_permutation  # noqa: E402
from learned_permutation.tools.evaluation import kl_divergence  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--scoring-tokens", type=int, default=4096)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    model_dir, tokenizer, full, held_out = smollm2_calibration(32, 512)
    dense = load_model(model_dir)
    sample = calibration_sample([full], args.scoring_tokens)
    runs = {path.name: load_file(str(path / PERMUTATIONS_FILE)) for path in (args.first, args.second)}
    names = list(runs)
    combos = [(layers, residual) for layers in names for residual in (*names, "identity")]
    rows = []
    for layers, residual in combos:
        model = copy.deepcopy(dense)
        for site in find_sites(model, 4):
            source = residual if site.kind == "residual" else layers
            if source != "identity" and site.name in runs[source]:
                fold_permutation(model, site, runs[source][site.name])
        linears, act_sq, _ = energies(model, full)
        _, _, dense_hidden = energies(model, sample)  # the folded dense model, in its own basis
        mask_model(model, {m: m.weight.detach().clone() for m in linears}, act_sq, {})
        _, calib_kl = calibration_losses(model, sample, dense_hidden)
        held = kl_divergence(dense, model, tokenizer, held_out, 512, max_windows=args.eval_windows)
        rows.append((layers, residual, calib_kl, held.kl, held.model.ppl))
        print(rows[-1], flush=True)
    command = "python benchmarks/site_attribution.py " + " ".join(sys.argv[1:])
    lines = [
        "# Residual vs per-layer sites of two saved permutations, SmolLM2-135M, Wanda 2:4 masks", "",
        f"Written by `{command}` at `{source_revision()}` in {(time.time() - started) / 60:.0f} min. Calibration KL: "
        f"the first {args.scoring_tokens} tokens of the calibration sample; held-out: {args.eval_windows} windows "
        "of 512 tokens of other C4 documents.", "",
        "| per-layer sites from | residual from | calibration KL | held-out KL | held-out ppl |", "|---|---|---|---|---|",
        *[f"| {a} | {b} | {c:.4f} | {d:.4f} | {e:.2f} |" for a, b, c, d, e in rows], "",
    ]
    (REPO / "results" / "ablations" / "site_attribution_smollm2.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
