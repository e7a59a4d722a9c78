"""lm-eval's WikiText perplexity task, run offline on a local file.

`wikitext_local.yaml` is lm-eval's ``wikitext`` task (document-level rolling loglikelihood, lm-eval's own
detokenizer and metrics) with the hub dataset replaced by a local WikiText raw file, passed as task
metadata so that no YAML has to be rewritten per file. `run_lm_eval_wikitext` runs it from Python.

`arc_easy_local`, `piqa_local`, `winogrande_local` and `hellaswag_local` are lm-eval's zero-shot tasks
of those names on the local copies in ``../shared/data/zeroshot`` (metadata ``zeroshot_dir`` points
elsewhere); `run_lm_eval_zeroshot` runs them on a fixed subset (the first ``limit`` items).

How the metrics relate to our token perplexity (`evaluation.perplexity`): lm-eval sums the
log-likelihood ``LL`` of every token of each detokenized article (rolling windows of the model's
context length, the first window conditioned on the prefix token, later windows on the tokens
before them) and normalises by units of the *original* article text:
``word_perplexity = exp(-LL / words)`` with words counted by ``re.split(r"\\s+", page)``,
``byte_perplexity = exp(-LL / bytes)`` and ``bits_per_byte = -LL / (bytes * ln 2)``. With ``T`` tokens,
``word_perplexity = token_perplexity ** (T / words)``: it does not depend on the tokenizer's
granularity, so it compares models with different vocabularies; token perplexity does not.

Two differences in which tokens are scored: lm-eval carries context across windows (ours restarts
each window from BOS), and lm-eval 0.4.13 encodes a page with the tokenizer's defaults, so with a
tokenizer that prepends BOS (Llama's) it also scores p(BOS | BOS) at the start of every article.
"""

from __future__ import annotations

from pathlib import Path

from learned_permutation.tools.data import InputError

TASK_DIR = Path(__file__).resolve().parent
"""Pass this directory to lm-eval's ``--include_path`` / ``TaskManager(include_path=...)``."""

TASK_NAME = "wikitext_local"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
ZEROSHOT_TASKS = ("arc_easy_local", "piqa_local", "winogrande_local", "hellaswag_local")


def run_lm_eval_wikitext(
    model_dir: str | Path,
    wikitext_file: str | Path,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    limit: int | None = None,
) -> dict[str, float]:
    """Run `wikitext_local` with lm-eval's Hugging Face backend on a saved model; returns the three metrics.

    ``limit`` evaluates only the first articles (lm-eval's ``--limit``). Needs nothing from the hub:
    set ``HF_HUB_OFFLINE=1`` to make that explicit.
    """
    model_dir, wikitext_file = Path(model_dir).resolve(), Path(wikitext_file).resolve()
    if not (model_dir / "config.json").is_file():
        raise InputError(f"no Hugging Face model at {model_dir} (config.json missing)")
    if not wikitext_file.is_file():
        raise InputError(f"WikiText file not found: {wikitext_file}")

    import lm_eval
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(TASK_DIR), metadata={"wikitext_file": str(wikitext_file)})
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype},
        tasks=[TASK_NAME],
        task_manager=task_manager,
        batch_size=batch_size,
        device=device,
        limit=limit,
    )
    task_results = results["results"][TASK_NAME]
    return {metric: float(task_results[f"{metric},none"]) for metric in METRICS}


def run_lm_eval_zeroshot(
    model_dir: str | Path,
    tasks: tuple[str, ...] = ZEROSHOT_TASKS,
    limit: int | None = None,
    zeroshot_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per task (``{"acc": ..., "acc_norm": ..., "n": items}``; WinoGrande has no
    acc_norm) on the first ``limit`` items of each local task (all when None)."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise InputError(f"no Hugging Face model at {model_dir} (config.json missing)")
    unknown = sorted(set(tasks) - set(ZEROSHOT_TASKS))
    if unknown:
        raise InputError(f"unknown zero-shot tasks {unknown}; choose from {ZEROSHOT_TASKS}")

    import lm_eval
    from lm_eval.tasks import TaskManager

    metadata = {} if zeroshot_dir is None else {"zeroshot_dir": str(Path(zeroshot_dir).resolve())}
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype},
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(TASK_DIR), metadata=metadata),
        batch_size=batch_size,
        device=device,
        limit=limit,
    )
    scores = {}
    for task in tasks:
        metrics = results["results"][task]
        scores[task] = {name: float(metrics[f"{name},none"]) for name in ("acc", "acc_norm") if f"{name},none" in metrics}
        scores[task]["n"] = int(results["n-samples"][task]["effective"])
    return scores
