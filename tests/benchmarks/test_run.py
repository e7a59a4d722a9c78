"""benchmarks/run.py end to end on a tiny model: the grid runs, skips what the shapes cannot take, and
writes the table, the JSON and both plots."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from tiny_models import save_tiny_model

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.\n\n"


def load_runner():
    spec = importlib.util.spec_from_file_location("benchmark_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_runner_writes_table_json_and_plots(tmp_path):
    model_dir = save_tiny_model("llama", tmp_path / "tiny")
    calibration, held_out = tmp_path / "calibration.txt", tmp_path / "held_out.txt"
    calibration.write_text("".join(f"Story {i} of {7 * i % 13} friends. {STORY}" for i in range(200)), encoding="utf-8")
    held_out.write_text(STORY * 20, encoding="utf-8")
    runner = load_runner()
    assert runner.main([
        "--model", str(model_dir), "--calibration", str(calibration), "--held-out", str(held_out),
        "--pruners", "wanda", "--methods", "none", "greedy", "--patterns", "2:4", "2:128",
        "--num-samples", "4", "--seq-len", "32", "--wikitext-windows", "2", "--lm-eval", "none",
        "--output-dir", str(tmp_path / "results"), "--checkpoint-dir", str(tmp_path / "checkpoints"),
        "--repeats", "2",
    ]) == 0
    out = tmp_path / "results" / "tiny"
    data = json.loads((out / "results.json").read_text())
    rows = {row["name"]: row for row in data["results"]}
    assert list(rows) == ["dense", "Wanda 2:4", "Wanda 2:4 + greedy perm", "Wanda 2:128", "Wanda 2:128 + greedy perm"]
    assert rows["Wanda 2:4 + greedy perm"]["exact_nm"] and rows["Wanda 2:4 + greedy perm"]["permutation_seconds"] > 0
    # gap closed is defined exactly where the unpermuted pruner is worse than dense (a random model may not be)
    gap = rows["Wanda 2:4"]["ppl"]["held-out"] - rows["dense"]["ppl"]["held-out"]
    assert ("held-out" in rows["Wanda 2:4 + greedy perm"]["gap_closed"]) == (gap > 0)
    assert "not a multiple of 128" in rows["Wanda 2:128"]["skipped"]
    markdown = (out / "results.md").read_text()
    assert "| Wanda 2:4 + greedy perm |" in markdown and "skipped" in markdown
    # the second calibration seed draws other rows: its numbers differ, and the summary holds both
    assert sorted(data["repeats"]) == ["0", "1"]
    summary = {row["name"]: row for row in data["seed_summary"]}
    assert list(summary) == ["dense", "Wanda 2:4", "Wanda 2:4 + greedy perm"]
    second = {row["name"]: row for row in data["repeats"]["1"]}
    assert summary["Wanda 2:4"]["ppl"]["held-out"] == [rows["Wanda 2:4"]["ppl"]["held-out"],
                                                       second["Wanda 2:4"]["ppl"]["held-out"]]
    assert summary["Wanda 2:4"]["ppl"]["held-out"][0] != summary["Wanda 2:4"]["ppl"]["held-out"][1]
    assert "Over 2 calibration sets" in markdown and "±" in markdown
    assert (out / "perplexity.png").stat().st_size > 0 and (out / "layer_errors.png").stat().st_size > 0
