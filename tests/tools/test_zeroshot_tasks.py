"""The offline zero-shot task YAMLs, scored by real lm-eval on the tiny random Llama.

Items are built so that a random model gets them right exactly when the gold index is wired through:
the gold choice is one character, the wrong ones are long, and a random byte-level model gives a long
continuation a far lower summed log-likelihood, so ``acc`` (unnormalised) is 1.0 only if lm-eval
compares against the right choice. WinoGrande's partial evaluation scores one shared continuation, so
there only loading and counting are checked.
"""

from __future__ import annotations

import bz2
import json

import pytest

from learned_permutation.tools.lm_eval_tasks import ZEROSHOT_TASKS, run_lm_eval_zeroshot
from learned_permutation.tools.lm_eval_tasks.zeroshot_local import (
    load_arc_easy,
    load_hellaswag,
    load_piqa,
    load_winogrande,
)
from shared_helpers import shared_file

LONG = "an answer that goes on and on and on for many more characters than the gold one does"
ITEMS = 3


def choices_with_gold(gold: int, count: int) -> list[str]:
    return ["x" if i == gold else f"{LONG} {i}" for i in range(count)]


@pytest.fixture(scope="module")
def zeroshot_dir(tmp_path_factory):
    """Local copies in the shared files' formats, ITEMS rows each, gold at varying positions."""
    root = tmp_path_factory.mktemp("zeroshot")
    arc = [{"query": f"Question: What is item {i}?", "choices": choices_with_gold(i % 4, 4), "gold": i % 4}
           for i in range(ITEMS)]
    piqa = [{"query": f"Question: How do I do thing {i}?\n", "choices": choices_with_gold(i % 2, 2), "gold": i % 2}
            for i in range(ITEMS)]
    winogrande = [{"context_options": [f"Ann met Bo so Ann {i}", f"Ann met Bo so Bo {i}"],
                   "continuation": "was glad.", "gold": i % 2} for i in range(ITEMS)]
    (root / "arc_easy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in arc))
    (root / "piqa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in piqa))
    (root / "winogrande.jsonl").write_text("".join(json.dumps(row) + "\n" for row in winogrande))
    lines = []
    for i in range(ITEMS):
        lines += [f"Cooking [title] step {i}: A man stands in a kitchen. he", str(3 - i % 4),
                  *choices_with_gold(3 - i % 4, 4)]
    with bz2.open(root / "hellaswag_val_full.txt.bz2", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return root


def test_loaders_give_lm_evals_fields(zeroshot_dir):
    arc = load_arc_easy(str(zeroshot_dir))["test"][1]
    assert arc["question"] == "What is item 1?"
    assert arc["choices"]["label"] == ["A", "B", "C", "D"] and arc["answerKey"] == "B"
    piqa = load_piqa(str(zeroshot_dir))["test"][1]
    assert (piqa["goal"], piqa["sol2"], piqa["label"]) == ("How do I do thing 1?", "x", 1)
    hellaswag = load_hellaswag(str(zeroshot_dir))["test"][0]
    assert hellaswag["query"] == "Cooking. step 0: A man stands in a kitchen. he"  # lm-eval's own cleaning
    assert hellaswag["gold"] == 3 and hellaswag["choices"][3] == "x"
    assert load_winogrande(str(zeroshot_dir))["test"][2]["gold"] == 0


def test_tasks_score_with_lm_eval(tiny_llama_dir, zeroshot_dir):
    scores = run_lm_eval_zeroshot(tiny_llama_dir, limit=ITEMS, zeroshot_dir=zeroshot_dir, batch_size=4)
    assert set(scores) == set(ZEROSHOT_TASKS)
    assert all(task["n"] == ITEMS for task in scores.values())
    for task in ("arc_easy_local", "piqa_local", "hellaswag_local"):
        assert scores[task]["acc"] == 1.0, task
        assert 0.0 <= scores[task]["acc_norm"] <= 1.0
    assert scores["winogrande_local"]["acc"] in {0.0, 1 / 3, 2 / 3, 1.0}
    assert "acc_norm" not in scores["winogrande_local"]


def test_shared_copies_load_whole():
    """Row counts of the shared files equal lm-eval's evaluation splits (skipped without the files)."""
    directory = shared_file("zeroshot/arc_easy.jsonl").parent
    counts = {"arc": len(load_arc_easy(str(directory))["test"]), "piqa": len(load_piqa(str(directory))["test"]),
              "winogrande": len(load_winogrande(str(directory))["test"]),
              "hellaswag": len(load_hellaswag(str(directory))["test"])}
    assert counts == {"arc": 2376, "piqa": 1838, "winogrande": 1267, "hellaswag": 10042}
