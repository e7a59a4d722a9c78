"""Writing an output folder so that a failed run never costs the previous one.

Every command that writes a folder (``oneshot``, ``export``, ``convert-llama2c``) writes into a fresh
folder beside the target and swaps it in only after success; with ``--overwrite`` the old folder is
removed only then, so a run that fails (a recipe check, a crash, Ctrl-C) leaves it as it was.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["refuse_existing_output", "staged_output"]


def refuse_existing_output(output_dir: str | Path, overwrite: bool) -> str | None:
    """Why ``output_dir`` may not be written (a non-empty folder without ``overwrite``, or a file), else None."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return f"{output_dir} exists and is not a folder: choose another output folder"
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        return f"output folder {output_dir} is not empty: choose another, or pass --overwrite (overwrite=True) to replace it"
    return None


@contextmanager
def staged_output(output_dir: str | Path) -> Iterator[Path]:
    """A new empty folder beside ``output_dir`` to write into. When the block succeeds it becomes
    ``output_dir`` (a previous ``output_dir`` is removed only then); when it fails it is removed and
    ``output_dir`` is left untouched."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            output_dir.rename(previous / output_dir.name)
            staging.rename(output_dir)
            shutil.rmtree(previous)
        else:
            staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
