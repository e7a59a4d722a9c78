"""The permutation modifier's cost per decoder layer against depth and against width (random Llama shapes).

Why: the modifier does one pass per decoder layer (statistics, per-layer sites) plus a constant number of
whole-model scoring passes (the residual selection), each of which costs about one forward pass per layer.
Its seconds per decoder layer must therefore be flat in depth; if they grow with the number of layers,
some work is repeated over all layers for each layer (quadratic in depth). Against width, the per-layer cost grows with the layer's size, and
the modifier's extra should grow no faster than the pruner's own cost.

For each shape of a depth series (``--depths`` layers at hidden ``--depth-hidden``) and a width series
(``--widths`` hidden at ``--width-layers`` layers; intermediate 3x hidden, hidden / 64 heads, a quarter of
them key/value heads), runs ``benchmarks/scale.py``'s pair of oneshot children per pruner: the pruner
alone and ``LearnedPermutationModifier`` + the pruner. Appends one JSON line per shape and pruner to
``<output>.jsonl``, then writes ``<output>.md`` (seconds per layer) and ``<output>.png`` (two panels:
seconds per layer against depth and against hidden width; per pruner the pruner alone, the modifier's
measured extra = with - alone, and the modifier's own report total), from the latest row of each shape
and pruner at these settings. ``--plot-only`` redraws them from the existing ``<output>.jsonl``.

    python benchmarks/scale_sweep.py              # layers 2, 4, 8 at hidden 512; hidden 512, 1024, 2048 at 4 layers
    python benchmarks/scale_sweep.py --plot-only  # redraw results/scale/sweep.md and .png from sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import PRUNERS, REPO, random_llama, run_child  # noqa: E402


def llama_shape(hidden: int, layers: int) -> str:
    """``hidden,intermediate,layers,heads,kv_heads`` with intermediate 3x hidden and 64-wide heads, 4 per KV head."""
    if hidden % 256:
        raise ValueError(f"hidden {hidden} is not a multiple of 256 (64-wide heads, 4 per key/value head)")
    return f"{hidden},{3 * hidden},{layers},{hidden // 64},{hidden // 256}"


def grid(args) -> list[str]:
    """The depth series, then the width series, each shape once."""
    shapes = [llama_shape(args.depth_hidden, layers) for layers in args.depths]
    shapes += [llama_shape(hidden, args.width_layers) for hidden in args.widths]
    return list(dict.fromkeys(shapes))


def settings(args) -> dict:
    return {"num_samples": args.num_samples, "seq_len": args.seq_len, "threads": args.threads}


def commit() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip()


def measure(args, shape: str, pruner: str, model: Path, command: str) -> dict:
    """One pair of children (pruner alone, with the modifier) for one shape: a row of the sweep."""
    child_args = argparse.Namespace(model=model, data=None, **settings(args))
    alone, permuted = run_child(child_args, pruner, False), run_child(child_args, pruner, True)
    hidden, _, layers, _, _ = (int(x) for x in shape.split(","))
    return {
        "shape": shape, "layers": layers, "hidden": hidden, "pruner": pruner, **settings(args),
        "alone_seconds": alone["seconds"], "with_seconds": permuted["seconds"],
        "alone_peak_rss_mib": alone["peak_rss_mib"], "with_peak_rss_mib": permuted["peak_rss_mib"],
        "report_seconds": permuted["report"]["total_seconds"], "phase_seconds": permuted["report"]["phase_seconds"],
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "host": platform.node(), "cpus": os.cpu_count(),
        "commit": commit(), "command": command,
    }


def run_grid(args, jsonl: Path, command: str) -> None:
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    for shape in grid(args):
        with tempfile.TemporaryDirectory() as scratch:
            model = random_llama(shape, Path(scratch) / "model")
            for pruner in args.pruners:
                row = measure(args, shape, pruner, model, command)
                with jsonl.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(table_row(row), flush=True)


def latest_rows(args, jsonl: Path) -> list[dict]:
    """The newest row of each shape and pruner of this grid measured at these settings, in grid order."""
    wanted = settings(args)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    latest = {(row["shape"], row["pruner"]): row for row in rows
              if all(row[key] == value for key, value in wanted.items())}
    return [latest[key] for key in ((s, p) for s in grid(args) for p in args.pruners) if key in latest]


TABLE_HEADER = (
    "| shape | pruner | pruner alone s/layer | modifier extra s/layer | modifier report s/layer | extra / alone "
    "| extra peak MiB |\n"
    "|---|---|---|---|---|---|---|"
)


def per_layer(row: dict) -> dict:
    """Seconds per decoder layer: the pruner alone, the modifier's measured extra, the modifier's report."""
    return {"alone": row["alone_seconds"] / row["layers"],
            "extra": (row["with_seconds"] - row["alone_seconds"]) / row["layers"],
            "report": row["report_seconds"] / row["layers"]}


def table_row(row: dict) -> str:
    cost = per_layer(row)
    return (f"| {row['shape']} | {row['pruner']} | {cost['alone']:.2f} | {cost['extra']:.2f} | {cost['report']:.2f} | "
            f"{cost['extra'] / cost['alone']:.2f}x | {row['with_peak_rss_mib'] - row['alone_peak_rss_mib']:.0f} |")


def write_table(args, rows: list[dict], path: Path) -> None:
    commands = "; ".join(f"`{c}`" for c in dict.fromkeys(row["command"] for row in rows))
    runs = ", ".join(dict.fromkeys(f"{row['host']} ({row['cpus']} CPUs) at {row['commit']}" for row in rows))
    header = (f"{args.num_samples} x {args.seq_len} calibration tokens, threads {args.threads}, {runs}; "
              f"shape = hidden,intermediate,layers,heads,kv_heads; {commands}")
    path.write_text("\n".join([header, "", TABLE_HEADER, *map(table_row, rows)]) + "\n")


def plot(args, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (depth_axis, width_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [(depth_axis, "layers", "hidden", args.depth_hidden, f"depth (layers; hidden {args.depth_hidden})"),
              (width_axis, "hidden", "layers", args.width_layers, f"hidden width ({args.width_layers} layers)")]
    styles = {"alone": ("-", "o", "pruner alone"), "extra": ("--", "s", "modifier extra (with - alone)"),
              "report": (":", "^", "modifier report total")}
    for axis, x_key, fixed_key, fixed, label in panels:
        for color, pruner in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], args.pruners):
            series = sorted((row[x_key], per_layer(row)) for row in rows
                            if row["pruner"] == pruner and row[fixed_key] == fixed)
            for kind, (line, marker, name) in styles.items():
                axis.plot([x for x, _ in series], [cost[kind] for _, cost in series], line, marker=marker,
                          color=color, label=f"{pruner}: {name}")
        ticks = sorted({row[x_key] for row in rows if row[fixed_key] == fixed})
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(tick) for tick in ticks])
        axis.set_ylim(bottom=0)
        axis.set_xlabel(label)
        axis.set_ylabel("seconds per decoder layer")
        axis.grid(alpha=0.3)
    depth_axis.legend(fontsize=7)
    figure.suptitle(f"Permutation modifier cost per layer ({args.num_samples} x {args.seq_len} tokens, "
                    f"threads {args.threads})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruners", nargs="+", default=list(PRUNERS), choices=list(PRUNERS))
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depths", nargs="+", type=int, default=[2, 4, 8], help="layers of the depth series")
    parser.add_argument("--depth-hidden", type=int, default=512, help="hidden width of the depth series")
    parser.add_argument("--widths", nargs="+", type=int, default=[512, 1024, 2048], help="hidden of the width series")
    parser.add_argument("--width-layers", type=int, default=4, help="layers of the width series")
    parser.add_argument("--output", type=Path, default=REPO / "results/scale/sweep",
                        help="writes <output>.jsonl (appended), <output>.md and <output>.png")
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and plot from <output>.jsonl")
    args = parser.parse_args(argv)
    jsonl, table, figure = (Path(f"{args.output}{suffix}") for suffix in (".jsonl", ".md", ".png"))
    if not args.plot_only:
        run_grid(args, jsonl, f"python benchmarks/scale_sweep.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    rows = latest_rows(args, jsonl)
    if not rows:
        raise SystemExit(f"no rows of this grid at {settings(args)} in {jsonl}")
    write_table(args, rows, table)
    plot(args, rows, figure)
    print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
