"""Does training permutations through the pruned model (``objective: model``) help, and is it the gradient?

For each model and calibration seed, 2:4 with the pruner (``--pruner``), every row a real ``oneshot`` run
evaluated from its saved checkpoint (held-out perplexity and KL to dense, as in ``benchmarks/run.py``):

* the pruner alone; the default (``method: select``); the single-solver methods ``ria`` and ``greedy``
  (with several seeds: the calibration-set noise the default is compared within); the default with solver seeds
  1 and 2 (the residual's reader rows sampled otherwise: the spread of equally good configurations); the default with
  ``greedy``'s three sweeps (its candidates are then the ``ria`` and ``greedy`` methods' configurations); with SparseGPT, the
  default scoring its configurations after SparseGPT's own update (``simulate_sparsegpt_update``); the default with a
  `ria+greedy` candidate (greedy started from ria's order);
* ``objective: model`` from the default's result, residual only (the default ``end_to_end``);
* the same from the unpermuted model (``candidates: [identity]``): the learning alone;
* ``objective: model`` on every site (residual, mlp, attn_vo);
* the equal-compute control: ``search: random`` (random shuffles of a few channels kept when the
  step's loss drops) on the residual, with ``--random-factor`` x the steps, so it spends about the
  same time as the gradient rows (the table lists each row's modifier seconds to check).

    python benchmarks/end_to_end_ablation.py                                  # stories260K, seeds 0 1 2
    python benchmarks/end_to_end_ablation.py --model llama-2m-gutenberg --seeds 0
    python benchmarks/end_to_end_ablation.py --model smollm2-135m --seeds 0 --steps 20 --train-tokens 2048 --threads 2
    python benchmarks/end_to_end_ablation.py --model smollm2-135m --pruner sparsegpt --seeds 1 2 --threads 2 \
        --only "pruner alone" default ria greedy      # the calibration-set noise on the real model
    python benchmarks/end_to_end_ablation.py --model smollm2-135m --seeds 1 2 --only "select + greedy" \
        --selection-only                              # which configuration select picks, without evaluating

SmolLM2-135M is calibrated as in ``benchmarks/real_model.py`` (32 x 512 C4 tokens) and measured on held-out C4
and WikiText-2 (16 windows of 512 tokens each).

Writes ``results/end_to_end/<model>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model  # noqa: E402
from run import REPO, build_setup, source_revision  # noqa: E402

from comparison import Comparison, EvalTexts, Variant, saved_report  # noqa: E402


def variants(pruner: str, steps: int, random_factor: int, train_tokens: int) -> list[tuple[str, Variant]]:
    other_score = "wanda" if pruner == "sparsegpt" else "sparsegpt"
    budget = {"steps": steps, "train_tokens": train_tokens, "batch_tokens": min(1024, train_tokens)}

    def seeded(label: str, seeds: tuple[int, ...], *args: tuple[str, object], method: str = "select") -> list[tuple[str, Variant]]:
        """``method`` with ``args`` at each modifier ``seed`` (labels share no prefix with other rows)."""
        return [(f"{label}, solver seed {seed}", Variant(pruner, method, modifier_args=(("seed", seed), *args)))
                for seed in seeds]

    def model_objective(label: str, extra: tuple = (), **knobs) -> tuple[str, Variant]:
        args = (("objective", "model"), ("end_to_end", {**budget, **knobs}), *extra)
        return label, Variant(pruner, "select", modifier_args=args)

    return [
        ("pruner alone", Variant(pruner, "none")),
        ("default (select)", Variant(pruner, "select")),
        ("ria", Variant(pruner, "ria")),
        ("greedy", Variant(pruner, "greedy")),
        # the ria solver on another pruner's importance than the one that follows (score: auto mirrors it)
        *[(f"{score}-score ria", Variant(pruner, "ria", modifier_args=(("score", score),)))
          for score in ("wanda", "ria", "sparsegpt") if score != pruner],
        *([("select + SparseGPT update simulated",
            Variant(pruner, "select", modifier_args=(("simulate_sparsegpt_update", True),))),
           ("select, SparseGPT update simulated, + ria@wanda candidate",  # no prefix of the row without the update
            Variant(pruner, "select", modifier_args=(("candidates", ("identity", "ria", "greedy", "ria@wanda")),
                                                     ("simulate_sparsegpt_update", True))))]
          if pruner == "sparsegpt" else []),
        # the same at each solver seed: does scoring SparseGPT's own weights pick the better of ria and greedy where
        # the mask-only score picks greedy too often (docs/results.md, "Session 21")?
        *(seeded("select, update simulated", (0, 1, 2), ("simulate_sparsegpt_update", True)) if pruner == "sparsegpt" else []),
        # the default with another seed for its random choices (the residual's sampled reader rows): equally good
        # configurations, so their spread is the noise floor a comparison between methods is read against
        *seeded("select", (1, 2)),
        # the default's candidates as methods at those seeds: each of the default's rows above is one of them (the
        # same configuration), so the comparison between the three is paired run by run
        *[row for method in ("ria", "greedy") for row in seeded(f"method {method}", (1, 2), method=method)],
        # the same with the residual solvers reading every sampled reader row, not 1,024 of them
        *seeded("select, all sampled rows", (0, 1, 2),
                ("solver_args", {"ria": {"rows": None}, "greedy": {"rows": None}})),
        # configurations scored on the whole 8,192-token sample instead of its first 2,048 tokens: does a longer
        # score pick the better of the default's candidates more often (the methods' rows above say which is)?
        *seeded("select, 8192 scored tokens", (0, 1, 2), ("scoring_tokens", 8192)),
        # residual rows weighted by the dense model's loss sensitivity (plugin/sensitivity.py), at each solver seed,
        # and the candidates as methods with it (paired with the default's rows as above)
        *seeded("select, fisher residual", (0, 1, 2), ("residual_weighting", "fisher")),
        *[row for method in ("ria", "greedy")
          for row in seeded(f"method {method}, fisher residual", (0, 1, 2), ("residual_weighting", "fisher"), method=method)],
        # which sites the default's gain and its spread come from
        *seeded("select, residual site only", (0, 1, 2), ("sites", ("residual",))),
        *seeded("select, per-layer sites only", (0, 1, 2), ("sites", ("mlp", "attn_vo"))),
        ("select + greedy 3 sweeps",  # the greedy method's configuration as select's candidate
         Variant(pruner, "select", modifier_args=(("solver_args", {"greedy": {"sweeps": 3}}),))),
        (f"select + ria@{other_score} candidate",  # the ria solver on the other pruner's score as a third candidate
         Variant(pruner, "select", modifier_args=(("candidates", ("identity", "ria", "greedy", f"ria@{other_score}")),))),
        ("select + ria+greedy candidate",
         Variant(pruner, "select", modifier_args=(("candidates", ("identity", "ria", "greedy", "ria+greedy")),))),
        # greedy keeping the most of Wanda's score squared (w^2 ||x||^2, math/scores.py): the same masks, but what it
        # maximises is the diagonal estimate of the output error left, not the L1 proxy; as a method and a candidate
        *([row for method in ("ria", "greedy")
           for row in seeded(f"method {method}, wanda_energy score", (0, 1, 2), ("score", "wanda_energy"), method=method)]
          if pruner == "wanda" else []),
        # and with the residual rows weighted by the loss sensitivity: each row's output error times its Fisher
        # weight, the diagonal second-order estimate of the loss the mask costs
        *(seeded("method greedy, wanda_energy score, fisher residual", (0, 1, 2), ("score", "wanda_energy"),
                 ("residual_weighting", "fisher"), method="greedy") if pruner == "wanda" else []),
        # (with SparseGPT too: greedy on the Wanda energy next to greedy on SparseGPT's own score)
        *seeded("select + greedy@wanda_energy", (0, 1, 2),
                ("candidates", ("identity", "ria", "greedy", "greedy@wanda_energy"))),
        model_objective("select + end-to-end residual"),
        model_objective("identity + end-to-end residual", extra=(("candidates", ("identity",)),)),
        model_objective("select + end-to-end all sites", sites=["residual", "mlp", "attn_vo"]),
        model_objective(f"select + random search residual ({random_factor}x steps)", search="random",
                        steps=steps * random_factor),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded (stories260K), llama-2m-gutenberg or smollm2-135m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    parser.add_argument("--pruner", default="wanda", choices=["wanda", "sparsegpt"])
    parser.add_argument("--steps", type=int, default=100, help="end_to_end.steps of the gradient rows")
    parser.add_argument("--train-tokens", type=int, default=4096, help="end_to_end.train_tokens")
    parser.add_argument("--random-factor", type=int, default=2, help="random-search steps per gradient step")
    parser.add_argument("--only", nargs="+",
                        help="run only these rows: a row's whole label, or a prefix of labels (a whole label selects "
                             "that row alone: 'ria' is not also 'ria-score ria')")
    parser.add_argument("--output-dir", type=Path, default=REPO / "results" / "end_to_end")
    parser.add_argument("--checkpoint-dir", type=Path, default=REPO / "outputs" / "end_to_end")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-windows", type=int, default=16,
                        help="SmolLM2: C4 held-out and WikiText-2 windows of 512 tokens (the first 16 are the default's)")
    parser.add_argument("--selection-only", action="store_true",
                        help="only each row's oneshot: print which configuration select chose and the calibration "
                             "losses it chose by (no evaluation, no tables)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, revision = time.perf_counter(), source_revision()
    rows = []
    chosen_rows = selected(variants(args.pruner, args.steps, args.random_factor, args.train_tokens), args.only)
    for seed in args.seeds:
        name, comparison = comparison_for(args, seed)
        for label, variant in chosen_rows:
            result = comparison.run(variant, evaluate=not args.selection_only)
            full_report = saved_report(comparison.checkpoint_dir(variant))
            report = full_report.get("end_to_end", {})
            rows.append({"model": name, "seed": seed, "label": label, "variant": variant.name,
                         "held_out_ppl": result.ppl.get("held-out"), "wikitext2_ppl": result.ppl.get("wikitext2"),
                         "held_out_kl": result.kl_to_dense if result.ppl else None,
                         "held_out_window_kl": result.window_kl,
                         "modifier_seconds": result.permutation_seconds,
                         "end_to_end_seconds": report.get("seconds"), "chosen": report.get("chosen"),
                         "calibration_held_out_losses": report.get("held_out_losses"),
                         "configuration_calibration_losses": full_report.get("configuration_calibration_losses"),
                         "chosen_configuration": full_report.get("chosen_configuration")})
            print(json.dumps(rows[-1]), flush=True)
        if args.selection_only:
            continue
        dense = comparison.run(Variant())
        rows.append({"model": name, "seed": seed, "label": "dense", "variant": "dense",
                     "held_out_ppl": dense.ppl["held-out"], "wikitext2_ppl": dense.ppl.get("wikitext2"), "held_out_kl": 0.0})
    if args.selection_only:
        return 0  # the rows above are the result: no held-out numbers to tabulate
    write(rows, args, revision, time.perf_counter() - started, name)
    return 0


def selected(rows: list[tuple[str, Variant]], only: list[str] | None) -> list[tuple[str, Variant]]:
    """The rows ``--only`` names: an entry equal to a label picks that row; any other entry is a prefix."""
    if not only:
        return rows
    labels = {label for label, _ in rows}
    return [(label, variant) for label, variant in rows
            if any(label == entry if entry in labels else label.startswith(entry) for entry in only)]


def comparison_for(args, seed: int) -> tuple[str, Comparison]:
    """The model's name and its comparison for calibration seed ``seed``: SmolLM2 as ``real_model.py``
    measures it (C4 held-out and WikiText-2), the small models as ``run.py`` does."""
    if args.model == real_model.NAME:
        return real_model.NAME, real_model.comparison(real_model.paired_run_settings(seed, args.eval_windows, args.checkpoint_dir))
    setup = build_setup(argparse.Namespace(model=args.model, num_samples=128, seq_len=256, held_out_samples=32,
                                           seed=0, held_out_chars=400_000), seed)
    return setup.name, Comparison(setup.model_dir, setup.calibration, 256, EvalTexts(setup.held_out),
                                  args.checkpoint_dir / setup.name, setup.eval_seq_len, seed=seed, layer_error_windows=4)


def write(rows: list[dict], args, revision: str, seconds: float, model: str) -> None:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    value = {(r["label"], r["seed"]): r for r in rows}
    dense = sum(value["dense", s]["held_out_ppl"] for s in args.seeds) / len(args.seeds)
    alone = [value.get(("pruner alone", s)) for s in args.seeds]
    base = sum(r["held_out_ppl"] for r in alone) / len(alone) if all(alone) else None
    wikitext = all(r.get("wikitext2_ppl") for r in rows)
    lines = ["| variant | " + " | ".join(f"ppl (seed {s})" for s in args.seeds)
             + " | mean ppl | gap closed | mean KL | mean modifier s | chosen (per seed) |"
             + (" WikiText-2 ppl (mean) | WikiText-2 gap closed |" if wikitext else ""),
             "|" + "---|" * (len(args.seeds) + 6 + 2 * wikitext)]
    for label in labels:
        picked = [value[label, s] for s in args.seeds if (label, s) in value]
        ppl = sum(r["held_out_ppl"] for r in picked) / len(picked)
        closed = f"{(base - ppl) / (base - dense):.0%}" if base and label not in ("dense", "pruner alone") else ""
        modifier = [r.get("modifier_seconds") or 0.0 for r in picked]
        lines.append(f"| {label} | " + " | ".join(f"{r['held_out_ppl']:.2f}" for r in picked)
                     + f" | {ppl:.2f} | {closed} | {sum(r['held_out_kl'] for r in picked) / len(picked):.4f} | "
                     f"{sum(modifier) / len(modifier):.1f} | {', '.join(str(r.get('chosen') or '') for r in picked)} |"
                     + (wikitext_cells(value, label, args.seeds) if wikitext else ""))
    out = args.output_dir
    held_out = "held-out C4 (first column) and WikiText-2" if wikitext else "held-out text as in `benchmarks/run.py`"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{model}_{args.pruner}"
    (out / f"{stem}.json").write_text(json.dumps({"commit": revision, "seconds": seconds, "argv": sys.argv[1:],
                                                   "rows": rows}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(
        f"# End-to-end permutation learning: {model}, {args.pruner} 2:4\n\nWritten by "
        f"`benchmarks/end_to_end_ablation.py {' '.join(sys.argv[1:])}` at commit `{revision}` "
        f"({seconds / 60:.1f} min, 2 shared CPU cores); calibration seeds {args.seeds}, {held_out}. Gap closed: share of the pruner-alone perplexity gap to dense (mean over seeds). "
        "`chosen`: which hard permutation the end-to-end stage kept on its held-out calibration rows "
        "(`start` = nothing beat the layer-wise result).\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def wikitext_cells(value: dict, label: str, seeds: list[int]) -> str:
    """Mean WikiText-2 perplexity of ``label`` and its share of the pruner-alone gap to dense."""
    def mean(name):
        picked = [value[name, s]["wikitext2_ppl"] for s in seeds if (name, s) in value]
        return sum(picked) / len(picked) if picked else None
    ppl, base, dense = mean(label), mean("pruner alone"), mean("dense")
    closed = f"{(base - ppl) / (base - dense):.0%}" if base and dense and label not in ("dense", "pruner alone") else ""
    return f" {ppl:.2f} | {closed} |"


if __name__ == "__main__":
    sys.exit(main())
