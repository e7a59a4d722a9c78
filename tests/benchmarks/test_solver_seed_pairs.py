"""The paired reading of the default against its candidates (benchmarks/solver_seed_pairs.py)."""

from __future__ import annotations

import pytest

from solver_seed_pairs import (
    calibration_versus_held_out,
    cell,
    contender_table,
    evaluation_noise,
    run_grid,
    selector_table,
    same_windows,
    share,
    stand_in_contenders,
    stand_in_defaults,
    versus_line,
)


def row(label: str, seed: int, kl: float, chosen: str | None = None) -> dict:
    return {"label": label, "seed": seed, "held_out_ppl": 10 * kl, "wikitext2_ppl": 20 * kl, "held_out_kl": kl,
            "chosen_configuration": chosen}


def keyed(*rows: dict) -> dict:
    return {(r["label"], r["seed"]): r for r in rows}


def test_the_default_stands_for_the_method_it_chose_and_must_agree_with_it():
    rows = keyed(row("select, solver seed 1", 0, 1.5, "ria"), row("method greedy, solver seed 1", 0, 1.4))
    grid, filled, checked = run_grid(rows, [1])
    assert grid[0, 1, "ria"]["held_out_kl"] == 1.5 and filled == {(0, 1, "ria")}
    assert grid[0, 1, "greedy"]["held_out_kl"] == 1.4 and not checked
    rows[("method ria, solver seed 1", 0)] = row("method ria, solver seed 1", 0, 1.5)
    assert run_grid(rows, [1])[2] == {(0, 1, "ria")}
    clash = keyed(row("select, solver seed 1", 0, 1.5, "ria"), row("method ria, solver seed 1", 0, 1.6))
    with pytest.raises(SystemExit, match="not the same model"):
        run_grid(clash, [1])
    # one model evaluated with another summation order (per window) agrees to about 1e-7: the same model
    resummed = keyed(row("select, solver seed 1", 0, 1.5, "ria"), row("method ria, solver seed 1", 0, 1.5 + 2e-7))
    assert run_grid(resummed, [1])[2] == {(0, 1, "ria")}


def test_a_default_row_stands_in_from_its_choice_on_other_rows_and_is_not_counted_as_checked():
    longer = keyed(row("ria", 0, 1.2), row("greedy", 0, 1.3), row("method ria, solver seed 1", 0, 1.25),
                   row("method greedy, solver seed 1", 0, 1.1), row("pruner alone", 1, 2.0))
    choices = keyed(row("default (select)", 0, 1.5, "greedy"), row("select, solver seed 1", 0, 1.4, "ria"),
                    row("select, solver seed 1", 1, 1.9, "identity"), row("select, solver seed 2", 0, 1.9, "ria"))
    choices["select, solver seed 1", 0]["configuration_calibration_losses"] = {"ria": {"kl": 1.9}, "greedy": {"kl": 2.0}}
    assert stand_in_defaults(longer, choices, [0, 1, 2]) == 3  # solver seed 2's ria row is not measured
    assert longer["select, solver seed 1", 0]["configuration_calibration_losses"]["ria"] == {"kl": 1.9}  # for best_of_seeds
    assert longer["default (select)", 0]["held_out_kl"] == 1.3 and longer["select, solver seed 1", 0]["held_out_kl"] == 1.25
    assert longer["select, solver seed 1", 1]["held_out_kl"] == 2.0  # the stored order: the pruner alone's model
    grid, filled, checked = run_grid(longer, [0, 1])
    assert grid[0, 0, "default"]["chosen_configuration"] == "greedy" and not filled and not checked
    measured = keyed(row("default (select)", 0, 1.0, "ria"))
    assert stand_in_defaults(measured, choices, [0]) == 0 and measured["default (select)", 0]["held_out_kl"] == 1.0


def test_a_run_py_default_is_the_candidate_with_its_very_kl_and_the_selector_is_scored_on_it():
    rows = keyed(row("default (select)", 0, 1.5), row("ria", 0, 1.5), row("greedy", 0, 1.4),
                 row("pruner alone", 0, 2.0), row("dense", 0, 0.0))
    grid, _, checked = run_grid(rows, [0])
    assert grid[0, 0, "default"]["chosen_configuration"] == "ria" and grid[0, 0, "default"]["choice_inferred"]
    assert not checked  # inferred, so not a check
    scored = selector_table(rows, grid, [])[-1].split(" | ")
    assert scored[1:4] == ["1", "0", "1.5000"] and scored[4] == "1.4000"  # one run, a wrong choice; the best
    assert scored[7].startswith("-0.1000, +0.0000")  # a perfect chooser (one run): greedy, 0.1 below ria


def test_a_contender_is_paired_with_each_method_only_on_the_runs_both_measured():
    rows = keyed(row("default (select)", 0, 1.5, "ria"), row("greedy", 0, 1.4),
                 row("select, solver seed 1", 0, 1.7, "greedy"), row("method ria, solver seed 1", 0, 1.9),
                 row("select, fisher, solver seed 0", 0, 1.3, "greedy"), row("select, fisher, solver seed 1", 0, 1.8, "ria"),
                 row("pruner alone", 0, 2.0), row("dense", 0, 0.0))
    grid, _, _ = run_grid(rows, [0, 1])
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in contender_table(rows, grid, "select, fisher")[4:]}
    # the default's model stands for ria's at solver seed 0 and greedy's at 1, where it chose them
    assert table["default"][1] == "2" and table["default"][4].startswith("1 / 0 / 1, -0.0500 ± 0.1500")
    assert table["ria"][4].startswith("2 / 0 / 0, -0.1500 ± 0.0500")  # 1.3 - 1.5 and 1.8 - 1.9
    assert table["greedy"][4].startswith("1 / 0 / 1, +0.0000 ± 0.1000")  # 1.3 - 1.4 and 1.8 - 1.7
    assert table["the solver it chose"][4].startswith("2 / 0 / 0, -0.1000 ± 0.0000")  # 1.3 - greedy 1.4, 1.8 - ria 1.9


def test_a_selection_only_contender_stands_for_the_model_it_chose():
    rows = keyed(row("default (select)", 0, 1.5, "ria"), row("greedy", 0, 1.4), row("pruner alone", 0, 2.0),
                 row("select, solver seed 1", 0, 1.7, "greedy"), row("method ria, solver seed 1", 0, 1.9),
                 row("dense", 0, 0.0))
    choices = {"select, dense, solver seed 0": "greedy", "select, dense, solver seed 1": "identity"}
    for name, chosen in choices.items():  # a --selection-only row: its choice, no held-out numbers
        rows[name, 0] = {"label": name, "seed": 0, "held_out_ppl": None, "wikitext2_ppl": None, "held_out_kl": None,
                         "chosen_configuration": chosen, "configuration_calibration_losses": {chosen: {"kl": 1.0}}}
    rows["select, dense, solver seed 2", 0] = {**rows["select, dense, solver seed 0", 0], "label": "select, dense, solver seed 2"}
    grid, _, _ = run_grid(rows, [0, 1])
    assert stand_in_contenders(rows, grid, ["select, dense"], [0, 1]) == 2  # solver seed 2 is not in the grid
    assert rows["select, dense, solver seed 0", 0]["held_out_kl"] == 1.4  # greedy's model at solver seed 0
    assert rows["select, dense, solver seed 1", 0]["held_out_kl"] == 2.0  # the stored order: the pruner alone's
    assert rows["select, dense, solver seed 1", 0]["chosen_configuration"] == "identity"
    assert rows["select, dense, solver seed 2", 0]["held_out_kl"] is None
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in contender_table(rows, grid, "select, dense")[4:]}
    assert table["default"][4].startswith("1 / 0 / 1, +0.1000 ± 0.2000")  # 1.4 - 1.5 and 2.0 - 1.7


def test_a_contender_is_paired_with_another_only_on_the_runs_both_measured():
    rows = keyed(row("select, a, solver seed 0", 0, 1.3), row("select, a, solver seed 1", 0, 1.8),
                 row("select, a, solver seed 0", 1, 1.1), row("select, b, solver seed 0", 0, 1.4),
                 row("select, b, solver seed 1", 0, 1.6), row("select, b, solver seed 1", 1, 9.0),
                 row("pruner alone", 0, 2.0), row("dense", 0, 0.0), row("pruner alone", 1, 2.0), row("dense", 1, 0.0))
    cells = versus_line(rows, "select, a", "select, b", [0, 1]).split(" | ")
    assert cells[0] == "| `select, b`" and cells[1] == "2"  # calibration seed 1 has no pair at either solver seed
    assert cells[4].startswith("1 / 0 / 1, +0.0500 ± 0.1500")  # 1.3 - 1.4 and 1.8 - 1.6
    assert versus_line(rows, "select, a", "select, c", [0, 1]).split(" | ")[1] == "0"


def test_the_evaluation_noise_pairs_two_methods_window_by_window():
    rows = keyed(row("default (select)", 0, 1.5, "greedy"), row("ria", 0, 1.6), row("pruner alone", 0, 2.0),
                 row("dense", 0, 0.0), row("select, solver seed 1", 0, 1.5, "ria"))
    rows["default (select)", 0]["held_out_window_kl"] = [1.0, 2.0, 1.5]
    rows["ria", 0]["held_out_window_kl"] = [1.2, 2.1, 1.5]
    rows["select, solver seed 1", 0]["held_out_window_kl"] = [1.0, 1.0, 1.0]
    grid, _, _ = run_grid(rows, [0, 1])
    lines = evaluation_noise(grid)
    # the default stands for greedy at solver seed 0 (the same model: no pair), and for ria at 1 (no other rows)
    assert len(lines) == 3 and lines[2].startswith("| 0, 0 | default - ria | 3 | -0.1000 ± 0.0577")
    assert evaluation_noise(run_grid(keyed(row("default (select)", 0, 1.5, "ria")), [0])[0]) == []


def test_rows_without_the_pruner_alone_have_no_gap_share_and_no_selector_score():
    """Rows evaluated on another held-out text than the pruner alone's (``--eval-windows``) still pair up."""
    rows = keyed(row("default (select)", 0, 1.5, "ria"), row("greedy", 0, 1.6), row("dense", 0, 0.0))
    grid, _, _ = run_grid(rows, [0])
    assert share(rows, grid[0, 0, "default"], 0, "held_out_ppl") is None
    assert selector_table(rows, grid, [])[-1].startswith("|---")  # no run to score


def test_calibration_seeds_keeps_only_those_seeds_runs(tmp_path, capsys):
    import json

    from solver_seed_pairs import main

    rows = [row(name, seed, kl, chosen) for seed in (0, 1) for name, kl, chosen in
            (("default (select)", 1.5 + seed, "ria"), ("ria", 1.5 + seed, None), ("greedy", 1.4 + seed, None),
             ("pruner alone", 2.0 + seed, None), ("dense", 0.0, None))]
    (tmp_path / "rows.json").write_text(json.dumps({"rows": rows}))
    main([str(tmp_path / "rows.json"), "--solver-seeds", "0"])
    assert "| 1, 0 |" in capsys.readouterr().out
    main([str(tmp_path / "rows.json"), "--solver-seeds", "0", "--calibration-seeds", "0"])
    printed = capsys.readouterr().out
    assert "| 0, 0 |" in printed and "| 1, 0 |" not in printed


def test_the_calibration_difference_is_set_beside_the_held_out_one_per_run():
    rows = keyed(row("default (select)", 0, 1.4, "greedy"), row("ria", 0, 1.3), row("pruner alone", 0, 2.0),
                 row("select, solver seed 1", 0, 1.5, "ria"), row("method greedy, solver seed 1", 0, 1.45))
    rows["default (select)", 0]["configuration_calibration_losses"] = {"ria": {"kl": 2.0}, "greedy": {"kl": 1.9}}
    rows["select, solver seed 1", 0]["configuration_calibration_losses"] = {"ria": {"kl": 1.8}, "greedy": {"kl": 1.85}}
    grid, _, _ = run_grid(rows, [0, 1])
    lines = calibration_versus_held_out(grid)
    assert lines[2] == "| 0, 0 | -0.1000 | +0.1000 | no |"  # chose greedy by 0.1; greedy's model is 0.1 worse
    assert lines[3] == "| 0, 1 | +0.0500 | -0.0500 | no |"
    assert lines[4] == "| mean over 2 runs | -0.0250 ± 0.0750 | +0.0250 ± 0.0750 | 0 of 2 |"


def test_a_row_given_twice_must_be_the_same_model_window_by_window():
    first = {**row("pruner alone", 1, 2.0), "held_out_window_kl": [1.9, 2.1, 2.0, 2.2]}
    longer = {**row("pruner alone", 1, 2.05), "held_out_window_kl": [1.9, 2.1 + 1e-7, 2.0, 2.2, 2.4, 1.8]}
    assert same_windows(first, longer) and same_windows(longer, first)  # the first windows of a longer text
    assert not same_windows(None, longer) and not same_windows(row("pruner alone", 1, 2.0), longer)
    other = {**longer, "held_out_window_kl": [1.9, 2.15, 2.0, 2.2]}
    with pytest.raises(SystemExit, match="two models under one label"):
        same_windows(first, other)


def test_a_cell_shows_a_dash_for_a_text_the_row_was_not_measured_on():
    assert cell(row("ria", 0, 1.5)) == "15.00 / 30.00 (1.5000)"
    assert cell({**row("ria", 0, 1.5), "wikitext2_ppl": None}) == "15.00 / - (1.5000)"  # stories260K rows
    assert cell(None) == "-"


def test_a_text_the_rows_were_not_measured_on_has_no_gap_share():
    """stories260K's ``end_to_end_ablation.py`` rows have no WikiText-2: that column is '-', the other a share."""
    rows = keyed(*({**r, "wikitext2_ppl": None} for r in (
        row("default (select)", 0, 1.5, "ria"), row("ria", 0, 1.5), row("greedy", 0, 1.6),
        row("pruner alone", 0, 2.0), row("dense", 0, 0.0))))
    grid, _, _ = run_grid(rows, [0])
    assert share(rows, grid[0, 0, "default"], 0, "wikitext2_ppl") is None
    assert share(rows, grid[0, 0, "default"], 0, "held_out_ppl") == pytest.approx(0.25)
