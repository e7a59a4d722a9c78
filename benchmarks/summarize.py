"""Write the headline tables of ``docs/results.md`` from the benchmark runs' ``results.json`` files.

For each model under ``results/benchmarks/``: every 2:4 and 4:8 row with WikiText-2 and held-out
perplexity, KL to dense, and the share of the unpermuted pruner's gap to dense that each permutation
method closes; the text between the ``<!-- tables:start -->`` and ``<!-- tables:end -->`` markers of
``docs/results.md`` is replaced, the rest of the page is left as written.

    python benchmarks/summarize.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from repeats import seed_summary_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "benchmarks"
PAGE = REPO / "docs" / "results.md"
START, END = "<!-- tables:start -->", "<!-- tables:end -->"


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def model_table(data: dict) -> str:
    rows = [r for r in data["results"] if not r["skipped"]]
    skipped = [r for r in data["results"] if r["skipped"]]
    lines = [
        f"### {data['model']}",
        "",
        f"{data['setup']}. Run time {data['seconds'] / 60:.1f} min. Full table, plots and command: "
        f"[`results/benchmarks/{data['model']}/results.md`](../results/benchmarks/{data['model']}/results.md).",
        "",
        "| method | WikiText-2 ppl | gap closed | held-out ppl | gap closed | KL to dense | layer err | perm s | lm-eval word ppl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl, gap = r["ppl"], r["gap_closed"]
        lm_eval = r["lm_eval"]["word_perplexity"] if r["lm_eval"] else None
        lines.append(
            f"| {r['name']} | {number(ppl.get('wikitext2'), '.2f')} | {percent(gap.get('wikitext2'))} | "
            f"{number(ppl['held-out'], '.2f')} | {percent(gap.get('held-out'))} | {r['kl_to_dense']:.4f} | "
            f"{number(r['mean_layer_error'], '.4f')} | {number(r['permutation_seconds'], '.1f')} | "
            f"{number(lm_eval, '.1f')} |"
        )
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{r['name']} ({r['skipped']})" for r in skipped) + "."]
    if data.get("seed_summary"):
        seeds = data["seed_summary"][0]["seeds"]
        lines += ["", f"Over {len(seeds)} calibration sets (seeds {', '.join(map(str, seeds))}; the table above is "
                  f"seed {seeds[0]}), same held-out text, mean ± standard deviation:", "",
                  seed_summary_table(data["seed_summary"])]
    return "\n".join(lines)


def main() -> int:
    runs = sorted(RESULTS.glob("*/results.json"))
    if not runs:
        raise SystemExit(f"no results.json under {RESULTS}; run benchmarks/run.py first")
    tables = "\n\n".join(model_table(json.loads(path.read_text())) for path in runs)
    page = PAGE.read_text()
    if START not in page or END not in page:
        raise SystemExit(f"{PAGE} has no {START} ... {END} markers")
    head, rest = page.split(START, 1)
    PAGE.write_text(f"{head}{START}\n{tables}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote {len(runs)} tables into {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
