"""Side-by-side comparison of pruning variants on one model: the engine behind ``examples/demo.py``
(the main job) and ``benchmarks/run.py`` (the full grid).

Every variant runs real ``oneshot`` on a fresh copy of the dense model with the same calibration rows,
saves its checkpoint, and is evaluated from what was saved: perplexity on each evaluation text,
KL(dense || variant) on the held-out text, exact N:M in storage order, per-Linear reconstruction error
against the dense weights in the checkpoint's channel order, the modifier's and the whole oneshot's
time, and optionally lm-eval's WikiText word perplexity.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer

from learned_permutation.plugin.artifacts import PERMUTATIONS_FILE, REPORT_FILE, fold_saved_permutations
from learned_permutation.tools.compress import compress
from learned_permutation.tools.evaluation import (
    check_nm_sparsity,
    kl_divergences,
    layer_reconstruction_errors,
    perplexity,
)
from learned_permutation.tools.lm_eval_tasks import run_lm_eval_wikitext
from learned_permutation.plugin.modifier import LearnedPermutationModifier
from learned_permutation.math import parse_mask_structure

PRUNER_LABELS = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}
PERMUTATION_METHODS = ("none", "ria", "greedy", "learned", "select")
IGNORE = ["re:.*lm_head"]


def _pruner_modifier(pruner: str, pattern: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    n, m = parse_mask_structure(pattern)
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[pruner]
    return cls(sparsity=1 - n / m, mask_structure=pattern, targets=["Linear"], ignore=IGNORE)


@dataclass(frozen=True)
class Variant:
    """One row: a pruner (None for the dense model), a permutation method and an N:M pattern.

    ``recipe_file`` runs that YAML instead of the recipe built from the fields (the demo runs the
    shipped recipes this way); the fields must still describe it, they name and group the row.
    ``modifier_args``: more ``LearnedPermutationModifier`` fields as ``(name, value)`` pairs (e.g.
    ``(("seed", 1),)``), shown in the row's name.
    """

    pruner: str | None = None
    method: str = "none"
    pattern: str = "2:4"
    recipe_file: Path | None = None
    modifier_args: tuple[tuple[str, object], ...] = ()  # extra LearnedPermutationModifier fields

    def __post_init__(self):
        if self.pruner is not None and self.pruner not in PRUNER_LABELS:
            raise ValueError(f"unknown pruner {self.pruner!r}; choose from {sorted(PRUNER_LABELS)}")
        if self.method not in PERMUTATION_METHODS:
            raise ValueError(f"unknown permutation method {self.method!r}; choose from {PERMUTATION_METHODS}")
        parse_mask_structure(self.pattern)

    @property
    def name(self) -> str:
        if self.pruner is None:
            return "dense"
        base = f"{PRUNER_LABELS[self.pruner]} {self.pattern}"
        if self.method == "none":
            return base
        settings = ", ".join(f"{key}={value}" for key, value in self.modifier_args)
        return f"{base} + {self.method} perm" + (f" [{settings}]" if settings else "")

    @property
    def baseline(self) -> Variant | None:
        """The same pruner and pattern without permutation: the gap this row is measured against."""
        if self.pruner is None or self.method == "none":
            return None
        return Variant(self.pruner, "none", self.pattern)

    def recipe(self):
        if self.recipe_file is not None:
            return str(self.recipe_file)
        permutation = [] if self.method == "none" else [
            LearnedPermutationModifier(mask_structure=self.pattern, method=self.method, **dict(self.modifier_args))
        ]
        return [*permutation, _pruner_modifier(self.pruner, self.pattern)]


def variant_grid(pruners, methods, patterns, modifier_args: tuple[tuple[str, object], ...] = ()) -> list[Variant]:
    """Dense first, then pruner x pattern x method, the unpermuted baseline first in each group;
    ``modifier_args`` go to every permuting variant."""
    ordered = [method for method in PERMUTATION_METHODS if method in methods]
    return [Variant()] + [
        Variant(pruner, method, pattern, modifier_args=() if method == "none" else modifier_args)
        for pruner in pruners for pattern in patterns for method in ordered
    ]


@dataclass(frozen=True)
class EvalTexts:
    """``held_out``: in-domain text for perplexity and KL to dense; ``extra``: more perplexity texts
    (name -> text), e.g. WikiText-2, each cut to its first ``max_windows`` windows (None: all; the key
    ``"held-out"`` cuts the held-out text)."""

    held_out: str
    extra: dict[str, str] = field(default_factory=dict)
    max_windows: dict[str, int | None] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    pruner: str | None
    method: str
    pattern: str
    ppl: dict[str, float] = field(default_factory=dict)
    kl_to_dense: float = 0.0
    window_kl: list[float] = field(default_factory=list)  # held-out KL per window (pairs two models' windows)
    exact_nm: bool | None = None  # None for the dense model
    layer_errors: dict[str, float] = field(default_factory=dict)  # per pruned Linear
    oneshot_seconds: float | None = None  # the whole oneshot call: calibration passes, modifiers, save
    permutation_seconds: float | None = None  # the permutation modifier's own time (its report)
    lm_eval: dict[str, float] | None = None
    gap_closed: dict[str, float] = field(default_factory=dict)  # per text: share of the baseline gap
    skipped: str | None = None  # why the variant could not run on this model

    @property
    def mean_layer_error(self) -> float | None:
        return sum(self.layer_errors.values()) / len(self.layer_errors) if self.layer_errors else None

    @property
    def pruner_seconds(self) -> float | None:
        """oneshot time minus the modifier's: the pruner plus the calibration passes it needs."""
        if self.oneshot_seconds is None:
            return None
        return self.oneshot_seconds - (self.permutation_seconds or 0.0)

    def to_json(self) -> dict:
        return {**asdict(self), "mean_layer_error": self.mean_layer_error, "pruner_seconds": self.pruner_seconds}


def load_model(model_dir: str | Path):
    """A checkpoint in float32 and eval mode: every number here is computed that way."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def undividable_linear(model, pattern: str) -> str | None:
    """The first pruned Linear whose input dimension is not a multiple of M, as a message; else None."""
    from compressed_tensors.utils import match_named_modules

    _, m = parse_mask_structure(pattern)
    for name, module in match_named_modules(model, ["Linear"], IGNORE):
        if module.in_features % m:
            return f"{name} has {module.in_features} input channels, not a multiple of {m}"
    return None


class Comparison:
    """Runs variants of one model against its dense self; checkpoints go under ``output_dir/<slug>``."""

    def __init__(
        self,
        model_dir: str | Path,
        calibration,
        seq_len: int,
        texts: EvalTexts,
        output_dir: str | Path,
        eval_seq_len: int,
        eval_batch_size: int = 16,
        pipeline: str = "independent",
        seed: int = 0,
        layer_error_windows: int | None = 16,
        dense=None,
        tokenizer=None,
    ):
        """``dense``/``tokenizer``: the model and tokenizer already loaded from ``model_dir`` (fp32, eval),
        when the caller needed them first (to sample calibration text); loaded here otherwise."""
        self.model_dir, self.output_dir = Path(model_dir), Path(output_dir)
        self.calibration, self.seq_len, self.texts = calibration, seq_len, texts
        self.eval_seq_len, self.eval_batch_size = eval_seq_len, eval_batch_size
        self.pipeline, self.seed, self.layer_error_windows = pipeline, seed, layer_error_windows
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.model_dir)
        self.dense = dense or load_model(self.model_dir)

    def checkpoint_dir(self, variant: Variant) -> Path:
        return self.model_dir if variant.pruner is None else self.output_dir / slug(variant.name)

    def run(self, variant: Variant, wikitext_file: Path | None = None, evaluate: bool = True) -> Result:
        """Compress (unless dense), evaluate the saved checkpoint (unless ``evaluate`` is off), and lm-eval
        it if a file is given."""
        result = Result(variant.name, variant.pruner, variant.method, variant.pattern)
        if variant.pruner is not None:
            result.skipped = undividable_linear(self.dense, variant.pattern)
            if result.skipped:
                logger.warning(f"{variant.name}: skipped: {result.skipped}")
                return result
            self._compress(variant, result)
        if not evaluate:
            return result
        model = load_model(self.checkpoint_dir(variant))
        self._evaluate(variant, model, result)
        if wikitext_file is not None:
            result.lm_eval = run_lm_eval_wikitext(self.checkpoint_dir(variant), wikitext_file)
        return result

    def _compress(self, variant: Variant, result: Result) -> None:
        output_dir = self.checkpoint_dir(variant)
        shutil.rmtree(output_dir, ignore_errors=True)  # this comparison's own output from an earlier run
        model = load_model(self.model_dir)
        torch.manual_seed(self.seed)
        start = time.perf_counter()
        compress(model, self.tokenizer, variant.recipe(), self.calibration, self.seq_len, output_dir, self.pipeline)
        result.oneshot_seconds = time.perf_counter() - start
        result.permutation_seconds = saved_report(output_dir).get("total_seconds")

    def _evaluate(self, variant: Variant, model, result: Result) -> None:
        if variant.pruner is not None:
            result.exact_nm = check_exact_nm(variant.name, model, variant.pattern)
        self._measure({variant.name: model}, {variant.name: result})
        if variant.pruner is not None:
            result.layer_errors = self._layer_errors(variant, model)

    def evaluate_saved(self, checkpoints: dict[str, Path], pattern: str) -> tuple[dict[str, Result], Result]:
        """Saved ``pattern`` checkpoints (by label) measured as ``run`` measures a row, less layer errors, against
        one dense pass shared by them all; and the dense row, from that same pass. Every checkpoint's exact N:M
        pattern is checked before any text is evaluated."""
        models = {label: load_model(path) for label, path in checkpoints.items()}
        results = {label: Result(label, None, "saved", pattern) for label in checkpoints}
        for label, model in models.items():
            results[label].exact_nm = check_exact_nm(label, model, pattern)
        dense = Result("dense", None, "none", "dense", ppl={"held-out": self._measure(models, results)})
        for label, text in self.texts.extra.items():
            dense.ppl[label] = self._perplexity(self.dense, label, text)
        return results, dense

    def _measure(self, models: dict, results: dict[str, Result]) -> float:
        """Held-out perplexity and KL to dense (one dense pass for all ``models``) and the extra texts'
        perplexity, into ``results`` (same keys); returns the dense model's held-out perplexity, from that pass."""
        texts = self.texts
        held_out = kl_divergences(self.dense, models, self.tokenizer, texts.held_out, self.eval_seq_len,
                                  self.eval_batch_size, texts.max_windows.get("held-out"))
        for label, model in models.items():
            result, measured = results[label], held_out[label]
            result.ppl["held-out"], result.kl_to_dense, result.window_kl = measured.model.ppl, measured.kl, measured.window_kl
            for text_label, text in texts.extra.items():
                result.ppl[text_label] = self._perplexity(model, text_label, text)
        return next(iter(held_out.values())).reference.ppl

    def _perplexity(self, model, text_label: str, text: str) -> float:
        windows = self.texts.max_windows.get(text_label)
        return perplexity(model, self.tokenizer, text, self.eval_seq_len, self.eval_batch_size, windows).ppl

    def _layer_errors(self, variant: Variant, model) -> dict[str, float]:
        reference = load_model(self.model_dir)
        if (self.checkpoint_dir(variant) / PERMUTATIONS_FILE).is_file():
            fold_saved_permutations(reference, self.checkpoint_dir(variant))
        return layer_reconstruction_errors(
            reference, model, self.tokenizer, self.texts.held_out, self.eval_seq_len, self.eval_batch_size,
            self.layer_error_windows, IGNORE,
        )


def check_exact_nm(label: str, model, pattern: str) -> bool:
    """True if every pruned Linear of ``model`` is exactly ``pattern`` in storage order; raises otherwise."""
    n, m = parse_mask_structure(pattern)
    check = check_nm_sparsity(model, n, m, IGNORE)
    if not check.ok:
        raise RuntimeError(f"{label}: not exactly {pattern} in storage order: {check.failures[:3]}")
    return True


def saved_report(checkpoint: Path) -> dict:
    """The permutation report a checkpoint was saved with; {} for a checkpoint without one."""
    report = checkpoint / REPORT_FILE
    return json.loads(report.read_text()) if report.is_file() else {}


def fill_gap_closed(results: list[Result]) -> None:
    """For each permuted row: the share of its unpermuted baseline's perplexity gap to dense that it
    closes, per evaluation text (1 = as good as dense, 0 = no better than the baseline, < 0 = worse)."""
    by_name = {result.name: result for result in results}
    dense = by_name.get("dense")
    for result in results:
        if result.skipped or result.pruner is None or result.method == "none" or dense is None:
            continue
        base = by_name.get(Variant(result.pruner, "none", result.pattern).name)
        if base is None or base.skipped:
            continue
        for label, value in result.ppl.items():
            gap = base.ppl[label] - dense.ppl[label]
            if gap > 0:
                result.gap_closed[label] = (base.ppl[label] - value) / gap


def results_table(results: list[Result], markdown: bool = False) -> str:
    """One row per variant: perplexities, KL, gap closed, mean layer error, N:M check, times."""
    labels = next((list(r.ppl) for r in results if r.ppl), [])
    header = ["method", *(f"ppl {label}" for label in labels), "KL to dense",
              *(f"gap closed {label}" for label in labels), "layer err", "exact N:M", "perm s", "oneshot s"]
    if any(r.lm_eval for r in results):
        header.append("lm-eval word ppl")
    rows = [header] + [_table_row(result, labels, "lm-eval word ppl" in header) for result in results]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "---|" * len(header))
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def _table_row(result: Result, labels: list[str], with_lm_eval: bool) -> list[str]:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    def percent(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    if result.skipped:
        cells = [result.name, f"skipped: {result.skipped}"] + [""] * (2 * len(labels) + 4)
        return cells + ([""] if with_lm_eval else [])
    exact = "-" if result.exact_nm is None else ("yes" if result.exact_nm else "NO")
    cells = [
        result.name,
        *(number(result.ppl.get(label), ".3f") for label in labels),
        f"{result.kl_to_dense:.4f}",
        *(percent(result.gap_closed.get(label)) for label in labels),
        number(result.mean_layer_error, ".4f"),
        exact,
        number(result.permutation_seconds, ".1f"),
        number(result.oneshot_seconds, ".1f"),
    ]
    if with_lm_eval:
        cells.append(number(result.lm_eval and result.lm_eval["word_perplexity"], ".2f"))
    return cells
