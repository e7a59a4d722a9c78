"""One table over calibration seeds from several ``end_to_end_ablation.py`` runs of the same model and pruner.

Long runs are split (one seed at a time, some rows at an earlier commit whose code is the same for them); this
joins their rows. Each input is a ``.json`` written by ``end_to_end_ablation.py`` or a ``.jsonl`` of the rows
it logs as it goes (a run stopped before its table); a later file's row replaces an earlier one's for the same
(variant, seed). Per variant: held-out C4 / WikiText-2 perplexity and KL per seed, then the mean over seeds of
each seed's share of the pruner-alone gap to dense (dense from the runs' ``dense`` rows) and the mean KL.

    python benchmarks/combine_seed_rows.py results/end_to_end/smollm2-135m_wanda_seeds01_28d331f.jsonl \\
        results/end_to_end/smollm2-135m_wanda_seeds01_default_ria_569501d.json \\
        results/end_to_end/smollm2-135m_wanda_seed2_569501d.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VARIANTS = ("pruner alone", "default (select)", "ria", "greedy")


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return json.loads(path.read_text())["rows"]


def table(rows: dict[tuple[str, int], dict]) -> list[str]:
    seeds = sorted({seed for label, seed in rows if label != "dense"})
    missing = [seed for seed in seeds if ("dense", seed) not in rows]
    if missing:
        raise SystemExit(f"no dense row for seeds {missing}: add a run of those seeds that wrote its .json")
    lines = ["| variant | " + " | ".join(f"seed {seed}: C4 / WikiText-2 (KL)" for seed in seeds)
             + " | C4 gap closed | WikiText-2 gap closed | mean KL |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for label in VARIANTS:
        found = [rows.get((label, seed)) for seed in seeds]
        cells = ["-" if row is None else f"{row['held_out_ppl']:.2f} / {row['wikitext2_ppl']:.2f} ({row['held_out_kl']:.4f})"
                 for row in found]
        complete = all(row is not None for row in found)
        shares = ["-", "-"]
        if complete and label != "pruner alone" and all(("pruner alone", seed) in rows for seed in seeds):
            shares = [f"{100 * _mean_share(rows, seeds, label, key):.1f}%" for key in ("held_out_ppl", "wikitext2_ppl")]
        kl = f"{sum(row['held_out_kl'] for row in found) / len(found):.4f}" if complete else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {shares[0]} | {shares[1]} | {kl} |")
    return lines


def _mean_share(rows: dict, seeds: list[int], label: str, key: str) -> float:
    """Mean over seeds of ``(alone - variant) / (alone - dense)`` for perplexity ``key``."""
    shares = [(rows["pruner alone", seed][key] - rows[label, seed][key])
              / (rows["pruner alone", seed][key] - rows["dense", seed][key]) for seed in seeds]
    return sum(shares) / len(shares)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", type=Path, nargs="+", help="later files' rows replace earlier ones'")
    args = parser.parse_args(argv)
    rows: dict[tuple[str, int], dict] = {}
    for path in args.inputs:
        for row in read_rows(path):
            rows[row["label"], row["seed"]] = row
    print(f"`python benchmarks/combine_seed_rows.py {' '.join(str(path) for path in args.inputs)}`\n")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
