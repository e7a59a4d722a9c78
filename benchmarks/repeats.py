"""Mean and spread of benchmark rows over several calibration sets (``benchmarks/run.py --repeats``).

Plain data in, plain data out (no torch), so ``benchmarks/summarize.py`` renders the same table from
``results.json`` without loading the libraries.
"""

from __future__ import annotations

import statistics


def seed_summary(repeats: dict[int, list]) -> list[dict]:
    """Per variant (in the first seed's row order, skipped rows left out): its per-seed perplexity per
    text, KL to dense and gap closed per text. ``repeats`` maps a calibration seed to its ``Result`` rows."""
    seeds = list(repeats)
    rows = {seed: {r.name: r for r in results if not r.skipped} for seed, results in repeats.items()}
    summary = []
    for name in rows[seeds[0]]:
        per_seed = [rows[seed][name] for seed in seeds if name in rows[seed]]
        labels = list(per_seed[0].ppl)
        summary.append({
            "name": name,
            "seeds": [seed for seed in seeds if name in rows[seed]],
            "ppl": {label: [r.ppl[label] for r in per_seed] for label in labels},
            "kl_to_dense": [r.kl_to_dense for r in per_seed],
            "gap_closed": {label: [r.gap_closed[label] for r in per_seed if label in r.gap_closed]
                           for label in labels},
        })
    return summary


def _mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(spread, fmt)}"


def _mean_percent(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):+.1f}%" if values else "-"


def seed_summary_table(summary: list[dict]) -> str:
    """Markdown: mean ± sample standard deviation over calibration seeds, and the per-seed held-out ppl."""
    labels = list(summary[0]["ppl"])
    header = ["method", *(f"{label} ppl" for label in labels), "held-out ppl per seed", "KL to dense",
              *(f"gap closed {label} (mean)" for label in labels)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [
            row["name"],
            *(_mean_sd(row["ppl"][label], ".2f") for label in labels),
            " / ".join(f"{value:.2f}" for value in row["ppl"]["held-out"]),
            _mean_sd(row["kl_to_dense"], ".4f"),
            *(_mean_percent(row["gap_closed"][label]) for label in labels),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
