"""Which per-layer solver settings make the pruned SmolLM2-135M closest to dense (Wanda 2:4 masks).

The per-layer sites (mlp, attn_vo) of SmolLM2-135M are permuted by one solver setting at a time
(solved from the calibration set's input energies, residual left as stored), every Linear is masked
as Wanda 2:4 would mask it (no weight update), and each setting is measured by its mean layer-wise
objective, the KL to dense on the modifier's calibration sample (what ``select`` sees) and on held-out
C4 (what users see), next to the solve time. ``select``'s candidates live or die by this.

    python benchmarks/per_layer_solvers.py

Writes ``results/ablations/per_layer_solvers_smollm2.md``.
"""

from __future__ import annotations

import argparse
import shlex
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import load_model  # noqa: E402
from residual_signal import M, N, SCORE, calibration_losses, energies, mask_model, smollm2_calibration  # noqa: E402
from run import REPO, source_revision  # noqa: E402

from learned_permutation.math import reconstruction_error, solve_permutation  # noqa: E402
from learned_permutation.plugin.selection import calibration_sample  # noqa: E402
from learned_permutation.structure import find_sites, fold_permutation  # noqa: E402
from learned_permutation.tools.evaluation import kl_divergence  # noqa: E402

SETTINGS = {
    "identity": ("identity", {}),
    "ria": ("ria", {}),
    "greedy rows 256, 1 sweep": ("greedy", {"rows": 256, "sweeps": 1}),
    "greedy rows 1024, 1 sweep": ("greedy", {"rows": 1024, "sweeps": 1}),
    "greedy rows 256, 3 sweeps": ("greedy", {"rows": 256, "sweeps": 3}),
    "greedy rows 1024, 3 sweeps (its defaults)": ("greedy", {}),
    "greedy from ria, rows 256, 1 sweep": ("greedy", {"rows": 256, "sweeps": 1, "from": "ria"}),
    "greedy rows 512, 1 sweep": ("greedy", {"rows": 512, "sweeps": 1}),
    "greedy every row, 1 sweep": ("greedy", {"rows": None, "sweeps": 1}),
    "greedy rows 1024, 1 sweep, mlp only": ("greedy", {"rows": 1024, "sweeps": 1, "kinds": ("mlp",)}),
    "greedy rows 512, 1 sweep, mlp only": ("greedy", {"rows": 512, "sweeps": 1, "kinds": ("mlp",)}),
    "greedy rows 1024, 1 sweep, attn_vo only": ("greedy", {"rows": 1024, "sweeps": 1, "kinds": ("attn_vo",)}),
}


def solve_sites(model, act_sq: dict, method: str, knobs: dict) -> tuple[dict, float, float]:
    """Each per-layer site's permutation by ``method``, the mean layer-wise objective, the solve seconds."""
    perms, objectives, seconds = {}, [], 0.0
    kinds = knobs.get("kinds", ("mlp", "attn_vo"))
    for site in find_sites(model, M, kinds=kinds):
        consumers = site.consumers_from_stats({n.module: act_sq[n.module] for n in site.consumer_modules})
        problem = dict(n=N, m=M, score_kind=SCORE, block_size=site.block_size)
        start = time.perf_counter()
        extra = {key: value for key, value in knobs.items() if key != "kinds"}
        if extra.pop("from", None) == "ria":
            extra["init"] = solve_permutation(consumers, method="ria", **problem)
        perms[site.name] = solve_permutation(consumers, method=method, **problem, **extra)
        seconds += time.perf_counter() - start
        objectives.append(reconstruction_error(consumers, perms[site.name], n=N, m=M, score_kind=SCORE))
    return perms, sum(objectives) / len(objectives), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample-tokens", type=int, default=8192, help="the modifier's calibration sample")
    parser.add_argument("--scoring-tokens", type=int, default=4096, help="select's scoring tokens")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--output", type=Path, default=REPO / "results" / "ablations" / "per_layer_solvers_smollm2.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    model_dir, tokenizer, full, held_out = smollm2_calibration(32, 512)
    dense = load_model(model_dir)
    sample = calibration_sample([full], args.sample_tokens)
    scoring = calibration_sample([full], args.scoring_tokens)
    _, act_sq_of_sample, _ = energies(dense, sample)
    rows = []
    for label in args.settings:
        method, knobs = SETTINGS[label]
        perms, objective, seconds = solve_sites(dense, act_sq_of_sample, method, knobs)
        model = copy.deepcopy(dense)
        for site in find_sites(model, M, kinds=knobs.get("kinds", ("mlp", "attn_vo"))):
            fold_permutation(model, site, perms[site.name])
        linears, act_sq, _ = energies(model, full)  # the pruner's energies: the whole calibration set
        _, _, dense_hidden = energies(model, scoring)
        mask_model(model, {m: m.weight.detach().clone() for m in linears}, act_sq, {})
        _, calib_kl = calibration_losses(model, scoring, dense_hidden)
        held = kl_divergence(dense, model, tokenizer, held_out, 512, max_windows=args.eval_windows)
        rows.append((label, objective, seconds, calib_kl, held.kl, held.model.ppl))
        print(rows[-1], flush=True)
    command = "python benchmarks/per_layer_solvers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Per-layer solver settings, SmolLM2-135M, Wanda 2:4 masks, residual as stored", "",
        f"Written by `{command}` at `{source_revision()}` in {(time.time() - started) / 60:.0f} min on "
        f"{args.threads} threads. Solved from the modifier's {args.sample_tokens}-token sample; calibration KL on the "
        f"first {args.scoring_tokens} tokens of the hash-ordered calibration set; held-out: {args.eval_windows} "
        "windows of 512 tokens of other C4 documents.", "",
        "| per-layer sites by | mean layer-wise objective | solve s (60 sites) | calibration KL | held-out KL | held-out ppl |",
        "|---|---|---|---|---|---|",
        *[f"| {a} | {b:.5f} | {c:.1f} | {d:.4f} | {e:.4f} | {f:.2f} |" for a, b, c, d, e, f in rows], "",
    ]
    args.output.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
