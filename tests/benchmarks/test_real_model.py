"""The real-model runner's bookkeeping: the time budget is enforced on a real child process, progress is
read back from the modifier's log lines, and cached rows are skipped unless asked to redo them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import real_model
from comparison import Variant


def test_budget_kills_a_child_whose_oneshot_has_not_finished(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    args = SimpleNamespace(budget_min=0.01)
    started = time.perf_counter()
    progress = tmp_path / "progress.jsonl"
    progress.write_text('{"seconds": 1.0, "passes": 1}\n{"seconds": 2.0, "passes": 2}\n')
    killed, passes = real_model.wait_for(child, args, Variant("wanda", "learned"), tmp_path / "no-checkpoint",
                                         started, progress)
    assert killed and passes == 2
    assert child.returncode is not None and time.perf_counter() - started < 30


def test_a_saved_checkpoint_stops_the_clock(tmp_path):
    """Past the budget but with the checkpoint saved, the child (now evaluating) runs to its end."""
    (tmp_path / "config.json").write_text("{}")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(6)"], start_new_session=True)
    killed, passes = real_model.wait_for(child, SimpleNamespace(budget_min=0.001), Variant("wanda", "learned"),
                                         tmp_path, time.perf_counter(), tmp_path / "no-progress.jsonl")
    assert not killed and passes == 0
    assert child.returncode == 0


def test_completed_sites_read_from_the_modifier_log(tmp_path):
    log = tmp_path / "variant.log"
    log.write_text(
        "2026-11-25T22:00:00.0 | _fold | INFO - residual: objective 0.2100 -> 0.1800, kept ria (812.4s)\n"
        "Loading weights: 100%|##########| 272/272\n"
        "2026-11-25T22:01:00.0 | _fold | INFO - model.layers.0.self_attn: objective 0.3 -> 0.2 (41.0s)\n"
    )
    sites = real_model.completed_sites(log)
    assert sites == [{"site": "residual", "seconds": 812.4}, {"site": "model.layers.0.self_attn", "seconds": 41.0}]
    row = {"status": "did not finish", "budget_min": 10, "sites_completed": sites, "whole_model_passes": 7}
    assert real_model.status_text(row) == (
        "did not finish in 10 min: 2 sites completed (residual 812s, L0.self_attn 41s), 7 whole-model passes")


def test_redo_selects_methods_or_everything():
    assert real_model.wants_redo(Variant("wanda", "select"), ["select"])
    assert not real_model.wants_redo(Variant("wanda", "ria"), ["select"])
    assert real_model.wants_redo(Variant(), ["dense"]) and real_model.wants_redo(Variant("sparsegpt", "none"), ["all"])


def test_cached_rows_are_skipped(tmp_path, monkeypatch):
    args = SimpleNamespace(output_dir=tmp_path, pruners=["wanda"], methods=["none"], patterns=["2:4"], redo=[])
    for variant in (Variant(), Variant("wanda", "none")):
        path = real_model.variant_file(args, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"status": "done"}))
    ran = []
    monkeypatch.setattr(real_model, "run_variant", lambda _args, variant: ran.append(variant) or {"status": "done"})
    monkeypatch.setattr(real_model, "write_report", lambda _args: None)
    real_model.run_grid(args)
    assert ran == []
    args.redo = ["none"]
    real_model.run_grid(args)
    assert ran == [Variant("wanda", "none")]
