"""Dataset loaders and document functions for the offline zero-shot tasks (``*_local.yaml``).

Each task reads one file of the local copies described in ``../shared/data/zeroshot/README.md`` (the
directory comes from task metadata ``zeroshot_dir``, else the shared data directory) and presents it in
the fields lm-eval's own prompt templates need, so the YAMLs keep lm-eval's prompts, choices and
metrics. lm-eval imports this file by path, so it imports nothing from its own package relatively.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path

from datasets import Dataset, DatasetDict

FILES = {"arc_easy": "arc_easy.jsonl", "piqa": "piqa.jsonl", "winogrande": "winogrande.jsonl",
         "hellaswag": "hellaswag_val_full.txt.bz2"}


def _file(task: str, zeroshot_dir: str | None) -> Path:
    if zeroshot_dir is None:
        from learned_permutation.tools.data import shared_data_dir

        zeroshot_dir = shared_data_dir() / "zeroshot"
    path = Path(zeroshot_dir) / FILES[task]
    if not path.is_file():
        raise FileNotFoundError(
            f"{task}_local: {path} not found; pass metadata {{\"zeroshot_dir\": \"/abs/path/zeroshot\"}}"
        )
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _split(rows: list[dict]) -> DatasetDict:
    return DatasetDict({"test": Dataset.from_list(rows)})


def load_arc_easy(zeroshot_dir: str | None = None, **_task_metadata) -> DatasetDict:
    """ARC-easy test in the hub's fields (question, choices.text/label, answerKey) for lm-eval's template."""
    rows = [{"question": row["query"].removeprefix("Question: ").strip(),
             "choices": {"text": row["choices"], "label": [chr(65 + i) for i in range(len(row["choices"]))]},
             "answerKey": chr(65 + row["gold"])} for row in _jsonl(_file("arc_easy", zeroshot_dir))]
    return _split(rows)


def load_piqa(zeroshot_dir: str | None = None, **_task_metadata) -> DatasetDict:
    """PIQA validation in the hub's fields (goal, sol1, sol2, label)."""
    rows = [{"goal": row["query"].removeprefix("Question: ").strip(), "sol1": row["choices"][0],
             "sol2": row["choices"][1], "label": row["gold"]} for row in _jsonl(_file("piqa", zeroshot_dir))]
    return _split(rows)


def load_winogrande(zeroshot_dir: str | None = None, **_task_metadata) -> DatasetDict:
    """WinoGrande xl validation: the two contexts, the shared continuation, the gold index."""
    return _split(_jsonl(_file("winogrande", zeroshot_dir)))


def winogrande_gold(doc: dict) -> int:
    """An int doc_to_text is how lm-eval marks partial evaluation: one continuation after several contexts."""
    return int(doc["gold"])


def load_hellaswag(zeroshot_dir: str | None = None, **_task_metadata) -> DatasetDict:
    """HellaSwag validation from its 6-lines-per-item text file, cleaned with lm-eval's own ``preprocess``."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    with bz2.open(_file("hellaswag", zeroshot_dir), "rt", encoding="utf-8") as handle:
        lines = handle.read().rstrip("\n").split("\n")
    if len(lines) % 6:
        raise ValueError(f"hellaswag_local: {len(lines)} lines, not 6 per item")
    rows = [{"query": preprocess(lines[i]), "choices": [preprocess(ending) for ending in lines[i + 2:i + 6]],
             "gold": int(lines[i + 1])} for i in range(0, len(lines), 6)]
    return _split(rows)
