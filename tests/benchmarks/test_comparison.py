"""The comparison engine behind the demo and the benchmark runner, with real oneshot on a tiny Llama."""

from __future__ import annotations

import contextlib
import json

import pytest
from datasets import Dataset

from learned_permutation import REPORT_FILE
from comparison import (
    Comparison,
    EvalTexts,
    Result,
    Variant,
    fill_gap_closed,
    results_table,
    undividable_linear,
    variant_grid,
)
from tiny_models import build_tiny_model, save_tiny_model

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "


def test_variant_names_baselines_and_grid_order():
    assert Variant().name == "dense" and Variant().baseline is None
    learned = Variant("sparsegpt", "learned", "4:8")
    assert learned.name == "SparseGPT 4:8 + learned perm"
    assert learned.baseline == Variant("sparsegpt", "none", "4:8")
    grid = variant_grid(["wanda"], ["learned", "none"], ["2:4", "4:8"])
    assert [v.name for v in grid] == [
        "dense", "Wanda 2:4", "Wanda 2:4 + learned perm", "Wanda 4:8", "Wanda 4:8 + learned perm"
    ]
    seeded = variant_grid(["wanda"], ["none", "ria"], ["2:4"], (("seed", 1),))
    assert [v.name for v in seeded] == ["dense", "Wanda 2:4", "Wanda 2:4 + ria perm [seed=1]"]
    assert seeded[1] == seeded[2].baseline  # the pruner alone has no modifier, so no seed
    with pytest.raises(ValueError, match="unknown pruner"):
        Variant("magnitude")
    with pytest.raises(ValueError, match="unknown permutation method"):
        Variant("wanda", "random")


def test_gap_closed_is_the_share_of_the_baseline_gap_per_text():
    rows = [
        Result("dense", None, "none", "2:4", ppl={"a": 10.0, "b": 20.0}),
        Result("Wanda 2:4", "wanda", "none", "2:4", ppl={"a": 30.0, "b": 40.0}),
        Result("Wanda 2:4 + learned perm", "wanda", "learned", "2:4", ppl={"a": 25.0, "b": 44.0}),
    ]
    fill_gap_closed(rows)
    assert rows[2].gap_closed == pytest.approx({"a": 0.25, "b": -0.2})
    assert rows[0].gap_closed == rows[1].gap_closed == {}
    table = results_table(rows, markdown=True)
    assert "| 25.0% | -20.0% |" in table and table.count("\n") == 4


def test_patterns_the_shapes_cannot_take_are_named():
    model = build_tiny_model("llama")  # intermediate 128, hidden 64: every input divides by 8 and 16
    assert undividable_linear(model, "4:8") is None
    assert undividable_linear(model, "2:128") == "model.layers.0.self_attn.q_proj has 64 input channels, not a multiple of 128"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    model_dir = save_tiny_model("llama", tmp_path_factory.mktemp("model"))
    calibration = Dataset.from_dict({"text": [STORY * 3] * 8})
    texts = EvalTexts(STORY * 6, {"again": STORY * 4}, {"again": 2})
    return Comparison(model_dir, calibration, 32, texts, tmp_path_factory.mktemp("out"), eval_seq_len=32,
                      layer_error_windows=4)


def test_dense_row_is_the_reference(comparison):
    dense = comparison.run(Variant())
    assert dense.kl_to_dense == pytest.approx(0.0, abs=1e-6)
    assert dense.exact_nm is None and dense.layer_errors == {} and dense.oneshot_seconds is None
    assert set(dense.ppl) == {"held-out", "again"}


def test_permuted_variant_is_pruned_exactly_and_timed(comparison):
    variant = Variant("wanda", "greedy", "2:4")
    result = comparison.run(variant)
    assert result.exact_nm is True
    assert len(result.layer_errors) == 14 and all(0 < e < 1 for e in result.layer_errors.values())
    report = json.loads((comparison.checkpoint_dir(variant) / REPORT_FILE).read_text())
    assert result.permutation_seconds == report["total_seconds"] > 0
    assert result.oneshot_seconds > result.permutation_seconds
    assert result.kl_to_dense > 0
    unpermuted = comparison.run(Variant("wanda", "none", "2:4"))
    assert unpermuted.permutation_seconds is None and unpermuted.pruner_seconds == unpermuted.oneshot_seconds


def test_variant_the_model_cannot_take_is_skipped_not_run(comparison):
    result = comparison.run(Variant("wanda", "none", "2:128"))
    assert result.skipped and "not a multiple of 128" in result.skipped
    assert not comparison.checkpoint_dir(Variant("wanda", "none", "2:128")).exists()
    assert "skipped: " in results_table([result])


@contextlib.contextmanager
def _forwards_of(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_saved_checkpoints_share_one_dense_pass_and_match_their_rows(comparison):
    rows = {method: comparison.run(Variant("wanda", method, "2:4")) for method in ("none", "ria")}
    checkpoints = {method: comparison.checkpoint_dir(Variant("wanda", method, "2:4")) for method in rows}
    with _forwards_of(comparison.dense) as one:
        comparison.evaluate_saved({"none": checkpoints["none"]}, "2:4")
    with _forwards_of(comparison.dense) as two:
        results, dense = comparison.evaluate_saved(checkpoints, "2:4")
    assert len(two) == len(one) > 0  # a second checkpoint adds no dense forward
    for method, row in rows.items():
        assert results[method].ppl == row.ppl and results[method].kl_to_dense == row.kl_to_dense
        assert results[method].window_kl == row.window_kl and results[method].exact_nm is True
    assert dense.ppl == comparison.run(Variant()).ppl


def test_a_saved_checkpoint_not_n_m_fails_before_any_text_is_evaluated(comparison):
    with _forwards_of(comparison.dense) as calls, pytest.raises(RuntimeError, match="dense: not exactly 2:4"):
        comparison.evaluate_saved({"dense": comparison.model_dir}, "2:4")
    assert calls == []
