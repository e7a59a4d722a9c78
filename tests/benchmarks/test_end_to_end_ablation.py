"""Which rows ``--only`` runs in benchmarks/end_to_end_ablation.py."""

from end_to_end_ablation import selected, variants


def labels(only):
    return [label for label, _ in selected(variants("sparsegpt", 10, 2, 1024), only)]


def test_a_whole_label_selects_that_row_alone():
    assert labels(["ria"]) == ["ria"]  # not also "ria-score ria"


def test_other_entries_are_prefixes():
    assert labels(["default", "method ria, solver seed"]) == [
        "default (select)", "method ria, solver seed 1", "method ria, solver seed 2"]
    assert labels(["ria-"]) == ["ria-score ria"]


def test_no_entries_select_every_row():
    assert labels(None) == [label for label, _ in variants("sparsegpt", 10, 2, 1024)]
