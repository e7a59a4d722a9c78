"""Dataset loader for the `wikitext_local` lm-eval task: a local WikiText raw file cut into articles.

lm-eval imports this file by path (``custom_dataset: !function wikitext_local.load_pages``) and calls
`load_pages` with the task's metadata, so it imports nothing from its own package relatively.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict


def _is_article_title(line: str) -> bool:
    """`` = Title = `` starts an article; `` = = Section = = `` and deeper headings do not."""
    stripped = line.strip()
    return stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")


def wikitext_pages(raw: str) -> list[str]:
    """Cut WikiText raw text into articles the way lm-eval's ``EleutherAI/wikitext_document_level`` data
    is cut: a page runs from an article title line up to the line before the next title, its lines
    joined with ``"\\n"``; text before the first title is a page only if it is not blank."""
    pages, current = [], []
    for line in raw.split("\n"):
        if _is_article_title(line) and current:
            pages.append("\n".join(current))
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return [page for page in pages if page.strip()]


def load_pages(wikitext_file: str | None = None, **_task_metadata) -> DatasetDict:
    """The ``test`` split of `wikitext_local`: one row ``{"page": article}`` per article of ``wikitext_file``.

    lm-eval passes the whole task metadata (version, model arguments, ...) as keyword arguments; only
    ``wikitext_file`` is used here.
    """
    if wikitext_file is None:
        raise ValueError(
            "the wikitext_local task needs the WikiText file: pass metadata "
            '{"wikitext_file": "/abs/path/wiki.valid.raw"} (lm_eval --metadata, or TaskManager(metadata=...))'
        )
    path = Path(wikitext_file)
    if not path.is_file():
        raise FileNotFoundError(f"wikitext_local: WikiText file not found: {path}")
    pages = wikitext_pages(path.read_text(encoding="utf-8"))
    if not pages:
        raise ValueError(f"wikitext_local: {path} holds no non-blank text")
    return DatasetDict({"test": Dataset.from_dict({"page": pages})})
