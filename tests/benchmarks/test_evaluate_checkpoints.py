"""Naming the checkpoints benchmarks/evaluate_checkpoints.py evaluates together."""

import pytest

from evaluate_checkpoints import checkpoint_path, parse_checkpoints


def _checkpoint(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_a_row_folder_resolves_to_its_one_checkpoint(tmp_path):
    inner = _checkpoint(tmp_path / "row" / "smollm2-135m" / "sparsegpt_2_4_ria_perm")
    assert checkpoint_path(tmp_path / "row") == inner
    assert checkpoint_path(inner) == inner
    assert parse_checkpoints([f"ria={tmp_path / 'row'}"]) == {"ria": inner}


def test_bad_entries_fail_before_any_loading(tmp_path):
    _checkpoint(tmp_path / "two" / "a")
    _checkpoint(tmp_path / "two" / "b")
    with pytest.raises(SystemExit, match="found 2"):
        parse_checkpoints([f"x={tmp_path / 'two'}"])
    with pytest.raises(SystemExit, match="found 0"):
        parse_checkpoints([f"x={tmp_path}/missing"])
    with pytest.raises(SystemExit, match="LABEL=DIR"):
        parse_checkpoints([str(tmp_path)])
    with pytest.raises(SystemExit, match="twice"):
        parse_checkpoints([f"x={tmp_path / 'two' / 'a'}", f"x={tmp_path / 'two' / 'b'}"])
