"""Saved SmolLM2 checkpoints of one calibration seed, evaluated together on that seed's held-out text.

``end_to_end_ablation.py`` evaluates each row as it makes it, the dense model's pass included; on the 64-window
text that pass is a third of a row's evaluation. Here every checkpoint of one calibration seed shares one dense
pass (``Comparison.evaluate_saved``, with ``end_to_end_ablation.py``'s SmolLM2 settings, so the same numbers).
Make the checkpoints with ``end_to_end_ablation.py --selection-only``, one ``--checkpoint-dir`` per row so none
overwrites another, then:

    python benchmarks/evaluate_checkpoints.py --seed 1 --eval-windows 64 \\
        --checkpoint "pruner alone=/tmp/ck/alone" --checkpoint "ria=/tmp/ck/ria" ... --output rows.json

Each ``LABEL=DIR`` is a checkpoint (or a folder with exactly one checkpoint below it). The rows have
``end_to_end_ablation.py``'s fields (label, seed, held-out C4 and WikiText-2 perplexity, KL to dense and per
window, the configuration the permutation report says was chosen) plus a dense row, so
``solver_seed_pairs.py`` reads them; the N:M pattern of each checkpoint is checked as there. No layer errors.
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
from comparison import saved_report  # noqa: E402
from run import source_revision  # noqa: E402

from learned_permutation.math import parse_mask_structure  # noqa: E402


def checkpoint_path(folder: Path) -> Path:
    """``folder`` if it is a checkpoint, else the one checkpoint below it (a ``--checkpoint-dir`` of a row)."""
    if (folder / "config.json").is_file():
        return folder
    found = sorted(path.parent for path in folder.rglob("config.json"))
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one checkpoint (a config.json) below it, found {len(found)}")
    return found[0]


def parse_checkpoints(entries: list[str]) -> dict[str, Path]:
    checkpoints = {}
    for entry in entries:
        label, sep, folder = entry.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"--checkpoint {entry!r}: write LABEL=DIR")
        if label in checkpoints:
            raise SystemExit(f"--checkpoint: label {label!r} given twice")
        checkpoints[label] = checkpoint_path(Path(folder))
    return checkpoints


def evaluate(checkpoints: dict[str, Path], seed: int, windows: int, pattern: str) -> list[dict]:
    """One row per checkpoint and a dense row, on calibration seed ``seed``'s held-out C4 and on WikiText-2."""
    comparison = real_model.comparison(real_model.paired_run_settings(seed, windows))
    results, dense = comparison.evaluate_saved(checkpoints, pattern)
    rows = []
    for label, result in results.items():
        report = saved_report(checkpoints[label])
        rows.append({"model": real_model.NAME, "seed": seed, "label": label, "checkpoint": str(checkpoints[label]),
                     "held_out_ppl": result.ppl["held-out"], "wikitext2_ppl": result.ppl["wikitext2"],
                     "held_out_kl": result.kl_to_dense, "held_out_window_kl": result.window_kl,
                     "modifier_seconds": report.get("total_seconds"),
                     "chosen_configuration": report.get("chosen_configuration"),
                     "configuration_calibration_losses": report.get("configuration_calibration_losses")})
        print(json.dumps({key: value for key, value in rows[-1].items() if key != "held_out_window_kl"}), flush=True)
    rows.append({"model": real_model.NAME, "seed": seed, "label": "dense", "held_out_ppl": dense.ppl["held-out"],
                 "wikitext2_ppl": dense.ppl["wikitext2"], "held_out_kl": 0.0})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="the calibration seed the checkpoints were made with")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--eval-windows", type=int, default=64, help="C4 held-out and WikiText-2 windows of 512 tokens")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True, help=".json the rows are written to")
    args = parser.parse_args(argv)
    checkpoints = parse_checkpoints(args.checkpoint)  # before any loading: a wrong path fails at once
    parse_mask_structure(args.pattern)  # and so does a malformed pattern
    torch.set_num_threads(args.threads)
    started, revision = time.perf_counter(), source_revision()
    rows = evaluate(checkpoints, args.seed, args.eval_windows, args.pattern)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"commit": revision, "seconds": time.perf_counter() - started,
                                       "argv": sys.argv[1:] if argv is None else argv, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
