"""One table over calibration seeds from several ``end_to_end_ablation.py`` runs of the same model and pruner.

Long runs are split (one seed at a time, some rows at an earlier commit whose code is the same for them); this
joins their rows. Each input is a ``.json`` written by ``end_to_end_ablation.py`` or a ``.jsonl`` of the rows
it logs as it goes (a run stopped before its table); a later file's row replaces an earlier one's for the same
(variant, seed). Per variant: held-out C4 / WikiText-2 perplexity and KL per seed, then the mean over seeds of
each seed's share of the pruner-alone gap to dense (dense from the runs' ``dense`` rows) and the mean KL; the
usual four variants first, then every other row the runs hold.

``--chosen FILES`` adds a row per ``select`` variant of those runs other than the default (``--selection-only`` rows too) made
of the held-out numbers of the method whose configuration it chose on each seed: with the same solver knobs,
seed and statistics that method's run folds the same permutations (a full row of both shows it).

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
CHOSEN_METHOD_ROWS = {"identity": "pruner alone", "ria": "ria", "greedy": "greedy",  # configuration -> its model's row
                      "ria@wanda": "wanda-score ria", "ria@sparsegpt": "sparsegpt-score ria"}


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return json.loads(path.read_text())["rows"]


def table(rows: dict[tuple[str, int], dict], variants: tuple[str, ...] = VARIANTS) -> list[str]:
    seeds = sorted({seed for label, seed in rows if label != "dense"})
    missing = [seed for seed in seeds if ("dense", seed) not in rows]
    if missing:
        raise SystemExit(f"no dense row for seeds {missing}: add a run of those seeds that wrote its .json")
    lines = ["| variant | " + " | ".join(f"seed {seed}: C4 / WikiText-2 (KL)" for seed in seeds)
             + " | C4 gap closed | WikiText-2 gap closed | mean KL |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for label in variants:
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
    """Mean over seeds of ``gap_share`` for perplexity ``key``."""
    shares = [gap_share(rows, rows[label, seed], seed, key) for seed in seeds]
    return sum(shares) / len(shares)


def gap_share(rows: dict, row: dict, seed: int, key: str) -> float:
    """``(alone - row) / (alone - dense)`` for perplexity ``key`` on ``seed``'s texts."""
    alone, dense = rows["pruner alone", seed][key], rows["dense", seed][key]
    return (alone - row[key]) / (alone - dense)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", type=Path, nargs="+", help="later files' rows replace earlier ones'")
    parser.add_argument("--chosen", type=Path, nargs="+", default=[],
                        help="runs whose select rows become rows of the chosen methods' held-out numbers")
    args = parser.parse_args(argv)
    rows: dict[tuple[str, int], dict] = {}
    for path in args.inputs:
        for row in read_rows(path):
            rows[row["label"], row["seed"]] = row
    chosen = chosen_rows(rows, [row for path in args.chosen for row in read_rows(path)])
    rows |= chosen
    print(f"`python benchmarks/combine_seed_rows.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    others = tuple(dict.fromkeys(label for label, _ in rows if label not in VARIANTS and label != "dense"))
    print("\n".join(table(rows, VARIANTS + others)))
    return 0


def chosen_rows(rows: dict[tuple[str, int], dict], selections: list[dict]) -> dict[tuple[str, int], dict]:
    """Per select row that names its ``chosen_configuration``: the held-out numbers of that method's row of
    the same seed, labelled ``<label>: the chosen method's model``."""
    found = {}
    for selection in selections:
        if selection.get("chosen_configuration") is None or selection["label"] in VARIANTS:
            continue  # not a select row, or one the table shows measured
        method = rows.get((CHOSEN_METHOD_ROWS[selection["chosen_configuration"]], selection["seed"]))
        if method is None:
            raise SystemExit(f"seed {selection['seed']}: no {selection['chosen_configuration']} row for the "
                             f"configuration {selection['label']!r} chose; add the run that has it")
        found[f"{selection['label']}: the chosen method's model", selection["seed"]] = method
    return found


if __name__ == "__main__":
    sys.exit(main())
