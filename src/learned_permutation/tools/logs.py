"""Keep the command line's and the demo's output readable: llm-compressor logs every Linear it prunes
(SparseGPT's METRIC lines) and warns "No accelerator available" at every device lookup, and
transformers/datasets draw progress bars for every load. ``quiet_third_party_logs`` silences what can
still be silenced after those libraries were imported; ``learned_permutation_cli.quiet_environment``,
which the CLI applies before importing anything (``--verbose`` skips both), covers the rest.
"""

from __future__ import annotations

import logging

from loguru import logger

from learned_permutation_cli import quiet_environment

# loguru logs of these packages (by module name) are switched off.
QUIETED_LOGURU_PACKAGES = ("llmcompressor", "compressed_tensors")


def quiet_third_party_logs() -> None:
    """Silence third-party logs, warnings and progress bars for the rest of the process; our own log
    lines stay."""
    quiet_environment()
    for package in QUIETED_LOGURU_PACKAGES:
        logger.disable(package)
    from datasets.utils.logging import disable_progress_bar as disable_datasets_progress_bar
    from transformers.utils.logging import disable_progress_bar, set_verbosity_error

    logging.getLogger("torch").setLevel(logging.ERROR)
    set_verbosity_error()
    disable_progress_bar()
    disable_datasets_progress_bar()
