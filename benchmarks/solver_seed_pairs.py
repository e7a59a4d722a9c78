"""The default against its own candidates as methods, paired run by run over calibration and solver seeds.

The modifier's ``seed`` (the solver seed: the residual's sampled reader rows, the solvers' row subsamples and
``greedy``'s windows) moves held-out numbers more than the methods differ (docs/results.md, session 16). But in
one run (one calibration set, one solver seed) the default's configuration *is* one of its candidates': the
``ria`` method's, the ``greedy`` method's or the stored order (the pruner alone), solved from the same sample
with the same seed. So the comparison that removes the solver-seed spread is paired: per run, the default's
model against the ``ria`` and ``greedy`` models of that very run. This reads ``end_to_end_ablation.py`` rows
(``.json`` or ``.jsonl``, later files replacing earlier rows; or ``benchmarks/run.py``'s ``results.json`` with
``--repeats`` and ``--solver-seed``, its 2:4 rows of ``--pruner``) labelled, per solver seed ``K`` > 0,
``select, solver seed K``, ``method ria, solver seed K``, ``method greedy, solver seed K`` (at seed 0:
``default (select)``, ``ria``, ``greedy``), and prints

1. per run: each method's held-out C4 / WikiText-2 perplexity (KL to dense); where a method's row is missing
   but the default chose that method's configuration in the run, the default's row stands for it (marked);
   where both exist they must agree (checked);
2. per method: the mean share of the pruner-alone gap to dense on C4 and WikiText-2 and the mean KL over every
   run, the mean KL per solver seed, and the default's paired wins / ties / losses against each method;
3. per selector (the default, and ``--selectors`` rows such as ``select, 8192 scored tokens, solver seed K``,
   ``--selection-only`` rows suffice): in how many runs it chose the candidate with the lowest held-out KL, and
   the mean held-out KL of its choices next to the best candidate's and each fixed method's;
4. with ``--against PREFIX``: a contender (rows ``PREFIX, solver seed K`` at every K, 0 included, e.g. the
   default with another setting) paired with the default, ``ria`` and ``greedy`` over the runs where it and
   they were measured, and against the same solver's configuration without its setting where it chose ``ria``
   or ``greedy``; with ``--versus PREFIX`` too, against that other contender over the runs both measured. A
   contender's ``--selection-only`` row (a choice only) stands for the model it chose in its run;
5. the evaluation's own noise: per run where two methods' rows carry their held-out KL per window
   (``held_out_window_kl``), their KL difference and its standard error over the windows (the same windows:
   what a second held-out text of that size could move the difference by);
6. with ``--choices FILES``: runs whose default row is not among the inputs (rows on a longer held-out text,
   ``evaluate_checkpoints.py``) take the default's choice from those files' default rows (made on the same
   calibration tokens, so the same choice whatever the held-out text) and its chosen method's row as the default's;
7. per run where the default's row has its calibration losses: the calibration KL difference between ``greedy``
   and ``ria`` beside the held-out one (does the calibration score lean toward one solver?);
8. best of the solver seeds: per calibration set, the configuration with the lowest calibration KL among every
   solver seed's candidates (those passes score the same tokens, whatever the seed: checked on the stored
   order's loss), with its held-out numbers; what choosing among several seeds' solves would give.

    python benchmarks/solver_seed_pairs.py results/end_to_end/smollm2-135m_wanda_seeds01_28d331f.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path

from combine_seed_rows import gap_share, read_rows

METHODS = ("default", "ria", "greedy")
SEED_ZERO_LABELS = {"default": "default (select)", "ria": "ria", "greedy": "greedy"}
SEEDED_LABELS = {"default": "select, solver seed {}", "ria": "method ria, solver seed {}",
                 "greedy": "method greedy, solver seed {}"}
KEYS = ("held_out_ppl", "wikitext2_ppl", "held_out_kl")
# One model evaluated twice agrees to every digit, or to about 1e-7 across the per-window summation (a771307): a KL
# difference within this is a tie (the same model); distinct configurations differ from the third digit.
SAME_MODEL = 1e-6
RUN_METHODS = {"select": "default", "ria": "ria", "greedy": "greedy"}  # run.py's method -> ours


def read_any(path: Path, pruner: str) -> list[dict]:
    """Rows of an ``end_to_end_ablation.py`` output, or the ``pruner`` 2:4 rows of a ``run.py`` results.json."""
    data = None if path.suffix == ".jsonl" else json.loads(path.read_text())
    if not isinstance(data, dict) or "repeats" not in data:
        return read_rows(path)
    rows = []
    for seed, results in data["repeats"].items():
        for result in results:
            if result["pruner"] is None:
                name = "dense"
            elif result["pruner"] != pruner or result["pattern"] != "2:4" or result.get("skipped"):
                continue
            elif result["method"] == "none":
                name = "pruner alone"
            elif result["method"] in RUN_METHODS:
                solver = re.search(r"\[.*seed=(\d+)", result["name"])
                name = label(RUN_METHODS[result["method"]], int(solver.group(1)) if solver else 0)
            else:
                continue
            rows.append({"label": name, "seed": int(seed), "held_out_ppl": result["ppl"]["held-out"],
                         "wikitext2_ppl": result["ppl"]["wikitext2"], "held_out_kl": result["kl_to_dense"]})
    return rows


def stand_in_defaults(rows: dict, choice_rows: dict, solver_seeds: list[int]) -> int:
    """Add to ``rows`` a default row per run that lacks one: its chosen method's (or the pruner alone's) row, the
    choice read from ``choice_rows``' default row of that run, with the calibration losses it chose by. The default's
    model is a function of the calibration tokens and the solver seed alone, so its choice holds on any held-out
    text. Returns the runs added."""
    added = 0
    for (name, cal), chooser in choice_rows.items():
        solver = next((k for k in solver_seeds if name == label("default", k)), None)
        if solver is None or (name, cal) in rows:
            continue
        chosen = chooser.get("chosen_configuration")
        source = rows.get(("pruner alone", cal)) if chosen == "identity" else (
            rows.get((label(chosen, solver), cal)) if chosen in METHODS[1:] else None)
        if source is not None:
            rows[name, cal] = _standing_in(source, name, chosen, chooser)
            added += 1
    return added


def stand_in_contenders(rows: dict, grid: dict, prefixes: list[str], solver_seeds: list[int]) -> int:
    """Give each ``--selection-only`` row of ``prefixes`` (a choice, no held-out numbers) the row of the model it
    chose in its run: the pruner alone's or that run's ``ria`` / ``greedy`` model (a selector only chooses among
    the candidates the solves made, which its setting does not change). Returns the rows filled."""
    filled = 0
    for (name, cal), row in list(rows.items()):
        solver = next((k for k in solver_seeds for prefix in prefixes if name == f"{prefix}, solver seed {k}"), None)
        chosen = row.get("chosen_configuration")
        if solver is None or row.get("held_out_kl") is not None or chosen is None:
            continue
        source = rows.get(("pruner alone", cal)) if chosen == "identity" else grid.get((cal, solver, chosen))
        if source is not None:
            rows[name, cal] = _standing_in(source, name, chosen, row)
            filled += 1
    return filled


def _standing_in(source: dict, name: str, chosen: str, chooser: dict) -> dict:
    """``source`` (the chosen model's row) as ``name``'s row, with the choice and the calibration losses it was made by."""
    return {**source, "label": name, "chosen_configuration": chosen, "stands_in": True,
            "configuration_calibration_losses": chooser.get("configuration_calibration_losses")}


def same_windows(earlier: dict | None, later: dict) -> bool:
    """Whether ``later`` re-measures ``earlier`` (the same label and calibration seed, both with per-window KL):
    their KL must agree on every window both have (a longer text's first windows are the shorter one's), as one
    model evaluated twice does; anything else is two models under one label, refused."""
    one, other = ((row or {}).get("held_out_window_kl") for row in (earlier, later))
    if not one or not other:
        return False
    common = min(len(one), len(other))
    if not all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(one[:common], other[:common])):
        raise SystemExit(f"{later['label']!r}, calibration seed {later['seed']}: given twice with other KL on its first "
                         f"{common} windows: two models under one label")
    return True


def label(method: str, solver_seed: int) -> str:
    return SEED_ZERO_LABELS[method] if solver_seed == 0 else SEEDED_LABELS[method].format(solver_seed)


def run_grid(rows: dict, solver_seeds: list[int]) -> tuple[dict, set, set]:
    """{(calibration seed, solver seed, method): row} for every run whose default row exists, the cells
    filled from the default's row, and the cells where the chosen method's own row was checked against it."""
    grid, filled, checked = {}, set(), set()
    calibration_seeds = sorted({seed for (_, seed) in rows})
    for cal in calibration_seeds:
        for solver in solver_seeds:
            default = rows.get((label("default", solver), cal))
            if default is None:
                continue
            reported = default.get("chosen_configuration")
            chosen = reported or _same_model(default, rows, cal, solver)
            default = grid[cal, solver, "default"] = {**default, "chosen_configuration": chosen,
                                                      "choice_inferred": reported is None}
            for method in METHODS[1:]:
                row = rows.get((label(method, solver), cal))
                if chosen == method and row is None:
                    row = default
                    filled.add((cal, solver, method))
                elif chosen == method and not math.isclose(row["held_out_kl"], default["held_out_kl"], rel_tol=SAME_MODEL):
                    raise SystemExit(f"calibration seed {cal}, solver seed {solver}: the default chose {method}'s "
                                     f"configuration but its KL {default['held_out_kl']} differs from the {method} "
                                     f"method's {row['held_out_kl']}: not the same model")
                elif chosen == method and reported == method and not default.get("stands_in"):
                    checked.add((cal, solver, method))
                if row is not None:
                    grid[cal, solver, method] = row
    return grid, filled, checked


def _same_model(default: dict, rows: dict, cal: int, solver: int) -> str | None:
    """The candidate whose model the default's is, where its row does not say (``run.py``): the one measured
    row with the very same held-out KL (distinct models never agree to every digit)."""
    candidates = {"identity": rows.get(("pruner alone", cal)),
                  **{method: rows.get((label(method, solver), cal)) for method in METHODS[1:]}}
    same = [name for name, row in candidates.items() if row is not None and row["held_out_kl"] == default["held_out_kl"]]
    return same[0] if len(same) == 1 else None


def share(rows: dict, row: dict, cal: int, key: str) -> float | None:
    """``gap_share``, None where pruning left no gap (it lowered that text's perplexity), the pruner alone's
    row is not among the inputs (e.g. rows evaluated on another held-out text) or a row was not measured on
    that text (the small models' ``end_to_end_ablation.py`` rows have no WikiText-2)."""
    if ("pruner alone", cal) not in rows:
        return None
    if any(measured.get(key) is None for measured in (row, rows["pruner alone", cal], rows["dense", cal])):
        return None
    gap = rows["pruner alone", cal][key] > rows["dense", cal][key]
    return gap_share(rows, row, cal, key) if gap else None


def cell(row: dict | None) -> str:
    """Held-out / WikiText-2 perplexity (KL); "-" for a text the row was not measured on."""
    if row is None:
        return "-"
    ppl = [f"{row[key]:.2f}" if row.get(key) is not None else "-" for key in ("held_out_ppl", "wikitext2_ppl")]
    return f"{ppl[0]} / {ppl[1]} ({row['held_out_kl']:.4f})"


def _mean_and_error(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:+.4f}"
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:+.4f} ± {spread / math.sqrt(len(values)):.4f}"


def per_run_table(grid: dict, filled: set) -> list[str]:
    lines = ["| calibration seed, solver seed | default (chose) | ria | greedy |", "|---|---|---|---|"]
    for cal, solver in sorted({(c, s) for c, s, _ in grid}):
        default = grid[cal, solver, "default"]
        cells = [f"{cell(default)} ({default.get('chosen_configuration', '?')})"]
        cells += [cell(grid.get((cal, solver, m))) + (" (= default)" if (cal, solver, m) in filled else "")
                  for m in METHODS[1:]]
        lines.append(f"| {cal}, {solver} | " + " | ".join(cells) + " |")
    return lines


def summary_table(rows: dict, grid: dict, solver_seeds: list[int]) -> list[str]:
    runs = sorted({(c, s) for c, s, _ in grid})
    complete = [run for run in runs if all((*run, m) in grid for m in METHODS)]
    lines = [f"Over the {len(complete)} runs where all three models exist:", "",
             "| method | held-out gap closed | WikiText-2 gap closed | mean KL | "
             + " | ".join(f"mean KL, solver seed {s}" for s in solver_seeds) + " | default's KL wins / ties / losses, paired KL difference (mean ± standard error) |",
             "|---|---|---|---|" + "---|" * len(solver_seeds) + "---|"]
    for method in METHODS:
        picked = [(cal, grid[cal, solver, method]) for cal, solver in complete]
        shares = [[share(rows, row, cal, key) for cal, row in picked] for key in KEYS[:2]]
        shares = ["-" if None in found else f"{100 * sum(found) / len(found):.1f}%" for found in shares]
        kl = sum(row["held_out_kl"] for _, row in picked) / len(picked)
        by_seed = []
        for s in solver_seeds:
            kls = [grid[cal, solver, method]["held_out_kl"] for cal, solver in complete if solver == s]
            by_seed.append(f"{sum(kls) / len(kls):.4f}" if kls else "-")
        record = "-"
        if method != "default":
            diffs = [grid[(*run, "default")]["held_out_kl"] - grid[(*run, method)]["held_out_kl"] for run in complete]
            record = _record(diffs)
        lines.append(f"| {method} | {shares[0]} | {shares[1]} | {kl:.4f} | "
                     + " | ".join(by_seed) + f" | {record} |")
    return lines


def selector_table(rows: dict, grid: dict, selectors: list[str]) -> list[str]:
    """How often each selector chose the candidate whose model has the lowest held-out KL, per run where all
    three candidates' models (the stored order's is the pruner alone) were measured."""
    runs = sorted({(c, s) for c, s, _ in grid if all((c, s, m) in grid for m in METHODS[1:]) and ("pruner alone", c) in rows})
    truth = {run: {"identity": rows["pruner alone", run[0]]["held_out_kl"],
                   **{m: grid[(*run, m)]["held_out_kl"] for m in METHODS[1:]}} for run in runs}
    lines = [f"Over the {len(runs)} runs where every candidate's model was measured (held-out KL):", "",
             "| selector | runs | chose the best candidate | mean KL of its choices | best candidate's | ria's | greedy's "
             "| best candidate - ria, best candidate - greedy (paired: what a perfect chooser could gain) |",
             "|---|---|---|---|---|---|---|---|"]
    for selector in ["select", *selectors]:
        choices = {}
        for run in runs:
            row = (grid[(*run, "default")] if selector == "select"
                   else rows.get((f"{selector}, solver seed {run[1]}", run[0])))
            if row is not None and row.get("chosen_configuration") in truth[run]:
                choices[run] = row["chosen_configuration"]
        if not choices:
            continue
        picked = [truth[run][choice] for run, choice in choices.items()]
        best = [min(truth[run].values()) for run in choices]
        right = sum(truth[run][choice] == min(truth[run].values()) for run, choice in choices.items())
        fixed = [sum(truth[run][m] for run in choices) / len(choices) for m in METHODS[1:]]
        ceiling = [_mean_and_error([min(truth[run].values()) - truth[run][m] for run in choices]) for m in METHODS[1:]]
        lines.append(f"| {selector} | {len(choices)} | {right} | {sum(picked) / len(picked):.4f} | "
                     f"{sum(best) / len(best):.4f} | {fixed[0]:.4f} | {fixed[1]:.4f} | {ceiling[0]}, {ceiling[1]} |")
    return lines


def contender_table(rows: dict, grid: dict, prefix: str) -> list[str]:
    """``prefix``'s rows against each method's, paired over the runs where both exist (negative: it is better)."""
    lines = [f"`{prefix}` against each method, paired run by run (negative KL difference: the contender is lower):", "",
             "| against | runs | contender: C4 / WikiText-2 gap closed, mean KL | method: C4 / WikiText-2 gap closed, "
             "mean KL | contender's KL wins / ties / losses, paired KL difference (mean ± standard error) |",
             "|---|---|---|---|---|"]

    def contender(cal: int, solver: int) -> dict | None:
        return rows.get((f"{prefix}, solver seed {solver}", cal))

    def chosen(cal: int, solver: int) -> str | None:
        return (contender(cal, solver) or {}).get("chosen_configuration")

    for method in [*METHODS, "the solver it chose"]:
        same = method == "the solver it chose"  # its configuration against the same solver's without the setting
        runs = [(cal, solver) for cal, solver, m in sorted(grid) if contender(cal, solver) is not None
                and (m == chosen(cal, solver) if same else m == method)]
        if not runs:
            continue
        ours = [(cal, contender(cal, solver)) for cal, solver in runs]
        theirs = [(cal, grid[cal, solver, chosen(cal, solver) if same else method]) for cal, solver in runs]
        lines.append(_paired_line(rows, method, ours, theirs))
    return lines


def versus_line(rows: dict, prefix: str, other: str, solver_seeds: list[int]) -> str:
    """``prefix``'s rows against ``other``'s (another contender), over the runs where both exist."""
    runs = sorted({(cal, solver) for _, cal in rows for solver in solver_seeds
                   if (f"{prefix}, solver seed {solver}", cal) in rows and (f"{other}, solver seed {solver}", cal) in rows})
    if not runs:
        return f"| `{other}` | 0 | - | - | - |"
    ours = [(cal, rows[f"{prefix}, solver seed {solver}", cal]) for cal, solver in runs]
    theirs = [(cal, rows[f"{other}, solver seed {solver}", cal]) for cal, solver in runs]
    return _paired_line(rows, f"`{other}`", ours, theirs)


def _paired_line(rows: dict, name: str, ours: list[tuple[int, dict]], theirs: list[tuple[int, dict]]) -> str:
    """One row of a paired table: runs, both sides' gap shares and mean KL, the KL record of ``ours``."""

    def summary(pairs: list[tuple[int, dict]]) -> str:
        shares = [[share(rows, row, cal, key) for cal, row in pairs] for key in KEYS[:2]]
        shares = ["-" if None in found else f"{100 * sum(found) / len(found):.1f}%" for found in shares]
        return f"{shares[0]} / {shares[1]}, {sum(row['held_out_kl'] for _, row in pairs) / len(pairs):.4f}"

    diffs = [a["held_out_kl"] - b["held_out_kl"] for (_, a), (_, b) in zip(ours, theirs)]
    return f"| {name} | {len(ours)} | {summary(ours)} | {summary(theirs)} | {_record(diffs)} |"


def _record(diffs: list[float]) -> str:
    """Wins / ties / losses of paired KL differences (negative: a win), then their mean and standard error."""
    return (f"{sum(d < -SAME_MODEL for d in diffs)} / {sum(abs(d) <= SAME_MODEL for d in diffs)} / "
            f"{sum(d > SAME_MODEL for d in diffs)}, {_mean_and_error(diffs)}")


def evaluation_noise(grid: dict) -> list[str]:
    """Per run, each pair of methods whose rows both have per-window held-out KL: the difference of their
    means and its standard error over the windows, paired window by window."""
    lines = ["| calibration seed, solver seed | pair | windows | KL difference (mean ± standard error over windows) |",
             "|---|---|---|---|"]
    for cal, solver in sorted({(c, s) for c, s, _ in grid}):
        found = {m: grid[cal, solver, m] for m in METHODS if (cal, solver, m) in grid}
        paired = set()  # the default's row stands for the method it chose: each pair of models once
        for first, second in [(a, b) for i, a in enumerate(METHODS) for b in METHODS[i + 1:]]:
            one, other = (found.get(m, {}).get("held_out_window_kl") for m in (first, second))
            if not one or not other or one is other or frozenset((id(one), id(other))) in paired:
                continue
            paired.add(frozenset((id(one), id(other))))
            diffs = [a - b for a, b in zip(one, other, strict=True)]
            lines.append(f"| {cal}, {solver} | {first} - {second} | {len(diffs)} | {_mean_and_error(diffs)} |")
    return lines if len(lines) > 2 else []


def calibration_versus_held_out(grid: dict) -> list[str]:
    """Per run where the default's row carries its calibration losses and both methods' models were measured: the
    calibration KL difference ``greedy`` - ``ria`` that the default chose by, beside the held-out one, and their
    means (a selector biased toward one solver shows as a calibration mean below or above the held-out mean)."""
    pairs = []
    for cal, solver in sorted({(c, s) for c, s, _ in grid}):
        losses = grid[cal, solver, "default"].get("configuration_calibration_losses") or {}
        if {"ria", "greedy"} <= set(losses) and all((cal, solver, m) in grid for m in METHODS[1:]):
            held_out = grid[cal, solver, "greedy"]["held_out_kl"] - grid[cal, solver, "ria"]["held_out_kl"]
            pairs.append((cal, solver, losses["greedy"]["kl"] - losses["ria"]["kl"], held_out))
    if not pairs:
        return []
    lines = ["| calibration seed, solver seed | calibration KL, greedy - ria | held-out KL, greedy - ria | same sign |",
             "|---|---|---|---|"]
    lines += [f"| {cal}, {solver} | {c:+.4f} | {h:+.4f} | {'yes' if c * h > 0 else 'no'} |" for cal, solver, c, h in pairs]
    lines.append(f"| mean over {len(pairs)} runs | {_mean_and_error([c for *_, c, _ in pairs])} | "
                 f"{_mean_and_error([h for *_, h in pairs])} | {sum(c * h > 0 for *_, c, h in pairs)} of {len(pairs)} |")
    return lines


def best_of_seeds(rows: dict, grid: dict, solver_seeds: list[int]) -> list[str]:
    """Per calibration set: the lowest calibration KL among every solver seed's candidate configurations."""
    lines = ["| calibration seed | chosen among seeds (calibration KL) | its model: C4 / WikiText-2 (KL) | "
             "the default's mean KL over those seeds |", "|---|---|---|---|"]
    for cal in sorted({c for c, _, _ in grid}):
        scored = {}
        for solver in solver_seeds:
            default = grid.get((cal, solver, "default"))
            losses = None if default is None else default.get("configuration_calibration_losses")
            if losses is None:
                return lines + [f"(calibration seed {cal}, solver seed {solver}: no calibration losses; not computed)"]
            for candidate, loss in losses.items():
                scored[candidate if candidate == "identity" else (candidate, solver)] = loss["kl"]
        identity = {grid[cal, s, "default"]["configuration_calibration_losses"]["identity"]["kl"] for s in solver_seeds}
        if max(identity) - min(identity) > 1e-9:
            raise SystemExit(f"calibration seed {cal}: the stored order's calibration KL differs between solver seeds "
                             f"({sorted(identity)}): the passes did not score the same tokens")
        best = min(scored, key=scored.get)
        model = rows["pruner alone", cal] if best == "identity" else grid.get((cal, best[1], best[0]))
        name = best if best == "identity" else f"{best[0]} at solver seed {best[1]}"
        mean = sum(grid[cal, s, "default"]["held_out_kl"] for s in solver_seeds) / len(solver_seeds)
        lines.append(f"| {cal} | {name} ({scored[best]:.4f}) | {cell(model)} | {mean:.4f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", type=Path, nargs="+", help="later files' rows replace earlier ones'")
    parser.add_argument("--solver-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calibration-seeds", type=int, nargs="+",
                        help="only these calibration seeds' rows (to compare with rows measured on fewer seeds)")
    parser.add_argument("--selectors", nargs="+", default=[],
                        help="label prefixes of other select rows (``<prefix>, solver seed K``) to judge as selectors")
    parser.add_argument("--against", help="label prefix of a contender's rows (``<prefix>, solver seed K``)")
    parser.add_argument("--versus", nargs="+", default=[],
                        help="with --against: label prefixes of other contenders to pair it with, run by run")
    parser.add_argument("--choices", type=Path, nargs="+", default=[],
                        help="rows whose default rows name the default's choice in runs the inputs lack a default row for")
    parser.add_argument("--pruner", default="wanda", choices=["wanda", "sparsegpt"], help="for run.py results")
    args = parser.parse_args(argv)
    rows: dict[tuple[str, int], dict] = {}
    remeasured = 0
    for path in args.inputs:
        for row in read_any(path, args.pruner):
            if args.calibration_seeds is None or row["seed"] in args.calibration_seeds:
                remeasured += same_windows(rows.get((row["label"], row["seed"])), row)
                rows[row["label"], row["seed"]] = row
    choice_rows = {(row["label"], row["seed"]): row for path in args.choices for row in read_any(path, args.pruner)}
    stood_in = stand_in_defaults(rows, choice_rows, args.solver_seeds)
    grid, filled, checked = run_grid(rows, args.solver_seeds)
    contenders = [prefix for prefix in [args.against, *args.versus] if prefix]
    chose_only = stand_in_contenders(rows, grid, contenders, args.solver_seeds)
    print(f"`python benchmarks/solver_seed_pairs.py {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    print("\n".join(per_run_table(grid, filled)), "\n")
    inferred = sum(row["choice_inferred"] for (_, _, method), row in grid.items() if method == "default")
    print(f"In {len(checked)} runs the chosen method's own row was measured too: the same model, to every digit. "
          f"In {inferred} runs the rows do not name the choice: it is the candidate with the default's very KL. "
          f"In {stood_in} runs the default's row is its chosen method's, the choice read from the --choices rows. "
          f"{chose_only} contender rows are choices alone (--selection-only): their chosen candidate's model's. "
          f"{remeasured} rows given twice (a model re-made and evaluated again) agree window by window.\n")
    print("\n".join(summary_table(rows, grid, args.solver_seeds)), "\n")
    print("\n".join(selector_table(rows, grid, args.selectors)), "\n")
    if args.against:
        lines = contender_table(rows, grid, args.against)
        print("\n".join(lines + [versus_line(rows, args.against, other, args.solver_seeds) for other in args.versus]), "\n")
    calibration = calibration_versus_held_out(grid)
    if calibration:
        print("\n".join(calibration), "\n")
    noise = evaluation_noise(grid)
    if noise:
        print("\n".join(noise), "\n")
    print("\n".join(best_of_seeds(rows, grid, args.solver_seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
