"""FP8 W8A8 + 2:4 on SmolLM2-135M: accuracy of the FP8 2:4 checkpoint next to the bf16 2:4 one, with and
without the permutation (issue 15). Writes ``results/fp8/<variant>.json`` as each row finishes and
``results/fp8/results.md`` from them.

Same data as ``benchmarks/run.py --model smollm2-135m`` (``real_model.build_data``: C4 calibration, C4
held-out, WikiText-2). Every model is compressed in bfloat16 (what vLLM 0.18.1 serves) and evaluated in
float32 on the CPU. transformers cannot run FP8 GEMMs on a CPU: it loads llm-compressor's FP8 checkpoint
through compressed-tensors, which de-quantizes the weights (FP8 value x scale, exact in float32) and
fake-quantizes every Linear's input to FP8 as the scheme says (per token, or per tensor with the
calibrated scale), so the numbers include the activation quantization, computed in float32.

Rows: dense; SparseGPT 2:4 bf16 with and without the permutation (``recipes/sparsegpt_2of4*.yaml``);
each of those quantized by the quantization stage of ``recipes/sparsegpt_2of4_fp8_{dynamic,static}.yaml``
(the same modifier, applied to the saved 2:4 checkpoint: the recipe's own pruning stage is deterministic
and ends in that checkpoint, and ``--end-to-end`` checks that the one-run recipe saves the same bytes);
and dense FP8_DYNAMIC, the quantization loss alone. Every 2:4 row is checked exactly 2:4 after
quantization and exported with ``--format vllm-2of4``.

Usage: python benchmarks/fp8.py [--num-samples 32 --seq-len 512 --eval-windows 16 --zeroshot-limit 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from learned_permutation.tools.compress import compress
from learned_permutation.tools.evaluation import kl_divergence, perplexity
from learned_permutation.tools.export import export_checkpoint, read_dense_weights
from learned_permutation.tools.lm_eval_tasks import run_lm_eval_zeroshot
from real_model import ZEROSHOT_SHORT, build_data

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (label, source row or None for the dense model, recipe file, which of its stages to run)
VARIANTS = {
    "dense": ("dense (bf16)", None, None, None),
    "sparsegpt-2of4": ("SparseGPT 2:4 bf16", "dense", "sparsegpt_2of4.yaml", None),
    "sparsegpt-2of4-perm": ("SparseGPT 2:4 bf16 + perm", "dense", "sparsegpt_2of4_permuted.yaml", None),
    "sparsegpt-2of4-fp8-dynamic": ("SparseGPT 2:4 + FP8 dynamic", "sparsegpt-2of4", "sparsegpt_2of4_fp8_dynamic.yaml", "quantization_stage"),
    "sparsegpt-2of4-perm-fp8-dynamic": ("SparseGPT 2:4 + perm + FP8 dynamic", "sparsegpt-2of4-perm", "sparsegpt_2of4_fp8_dynamic.yaml", "quantization_stage"),
    "sparsegpt-2of4-fp8-static": ("SparseGPT 2:4 + FP8 static", "sparsegpt-2of4", "sparsegpt_2of4_fp8_static.yaml", "quantization_stage"),
    "sparsegpt-2of4-perm-fp8-static": ("SparseGPT 2:4 + perm + FP8 static", "sparsegpt-2of4-perm", "sparsegpt_2of4_fp8_static.yaml", "quantization_stage"),
    "dense-fp8-dynamic": ("dense + FP8 dynamic", "dense", "sparsegpt_2of4_fp8_dynamic.yaml", "quantization_stage"),
}
# zero-shot costs minutes a row on 2 CPU cores: by default only the rows the comparison needs
ZEROSHOT_ROWS = ("dense", "sparsegpt-2of4", "sparsegpt-2of4-perm", "sparsegpt-2of4-fp8-dynamic", "sparsegpt-2of4-perm-fp8-dynamic")
END_TO_END = ("sparsegpt_2of4_fp8_dynamic_permuted.yaml", "sparsegpt-2of4-perm-fp8-dynamic")


def recipe_text(file: str, stage: str | None) -> str:
    recipe = yaml.safe_load((RECIPES / file).read_text())
    return yaml.safe_dump(recipe if stage is None else {stage: recipe[stage]}, sort_keys=False)


def groups_over_24(folder: Path) -> int:
    """4-column groups holding more than 2 non-zeros, over every decoder Linear (0: exactly 2:4)."""
    over = 0
    for _, shard in read_dense_weights(folder):
        for name, weight in shard.items():
            if name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS:
                over += int(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) > 2).sum())
    return over


def without_recipe(folder: Path) -> Path:
    """``folder`` seen without its recipe.yaml (links to every other file). llm-compressor 0.14 appends the
    source model's recipe.yaml to the one it saves and parses it with yaml.safe_load, which cannot read the
    ``!!python/tuple`` it wrote itself for LearnedPermutationModifier's tuple-valued ``end_to_end.temperature``:
    quantizing a saved permuted checkpoint would fail after the work, at save time."""
    if not (folder / "recipe.yaml").is_file():
        return folder
    view = folder.with_name(f".{folder.name}.without-recipe")
    view.mkdir(exist_ok=True)
    for path in folder.iterdir():
        if path.name != "recipe.yaml" and not (view / path.name).exists():
            (view / path.name).symlink_to(path)
    return view


def run_compression(args, name: str, calibration) -> tuple[Path, float]:
    _, source, file, stage = VARIANTS[name]
    out = args.checkpoints / name
    if (out / "config.json").is_file():
        return out, float("nan")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir = without_recipe(args.checkpoints / source)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.bfloat16)
    started = time.perf_counter()
    recipe_path = args.checkpoints / f"{name}.recipe.yaml"
    recipe_path.write_text(recipe_text(file, stage))
    compress(model, tokenizer, str(recipe_path), calibration, args.seq_len, out)
    return out, time.perf_counter() - started


def evaluate(args, name: str, folder: Path, reference, tokenizer, c4_text: str, wikitext: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    compared = kl_divergence(reference, model, tokenizer, c4_text, args.eval_seq_len, 8, args.eval_windows)
    wiki = perplexity(model, tokenizer, wikitext, args.eval_seq_len, 8, args.eval_windows)
    row = {"c4_ppl": compared.model.ppl, "kl": compared.kl, "wikitext2_ppl": wiki.ppl}
    if args.zeroshot_limit and name in args.zeroshot_rows:
        scores = run_lm_eval_zeroshot(folder, limit=args.zeroshot_limit)
        row["zeroshot"] = {task: score["acc"] for task, score in scores.items()}
    return row


def commit() -> str:
    """HEAD, marked ``+changes`` when the working tree differs (the modifier's code is what a row measures)."""
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_variant(args, name: str, data) -> dict:
    calibration, c4_text, wikitext, reference, tokenizer = data
    folder, seconds = (args.checkpoints / "dense", 0.0) if name == "dense" else run_compression(args, name, calibration)
    row = {"variant": name, "label": VARIANTS[name][0], "recipe": VARIANTS[name][2], "stage": VARIANTS[name][3],
           "compress_seconds": seconds, "commit": args.commit}
    if "2of4" in name:
        row["groups_over_2of4"] = groups_over_24(folder)
        started = time.perf_counter()
        export_checkpoint(folder, args.checkpoints / f"{name}.vllm-2of4", "vllm-2of4", overwrite=True)
        row["vllm_2of4_export_seconds"] = time.perf_counter() - started
    row |= evaluate(args, name, folder, reference, tokenizer, c4_text, wikitext)
    return row


def end_to_end(args, dense_dir: Path, calibration) -> dict:
    """The one-run FP8 recipe on the dense model saves the same tensors as the two-step row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file, twin = END_TO_END
    out = args.checkpoints / "end-to-end"
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)
    compress(model, AutoTokenizer.from_pretrained(dense_dir), str(RECIPES / file), calibration, args.seq_len, out)
    seconds = time.perf_counter() - started
    ours = {name: t for _, shard in read_dense_weights(out) for name, t in shard.items()}
    theirs = {name: t for _, shard in read_dense_weights(args.checkpoints / twin) for name, t in shard.items()}
    same = ours.keys() == theirs.keys() and all(
        torch.equal(ours[key].view(torch.uint8), theirs[key].view(torch.uint8)) for key in ours)
    return {"variant": "end-to-end", "recipe": file, "commit": args.commit, "compress_seconds": seconds, "groups_over_2of4": groups_over_24(out),
            "identical_to": twin, "identical": same}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_report(args) -> None:
    rows = {path.stem: json.loads(path.read_text()) for path in sorted(args.output.glob("*.json"))}
    lines = [
        "# FP8 W8A8 + 2:4 on SmolLM2-135M",
        "",
        f"Written by `{' '.join(['python', 'benchmarks/fp8.py', *sys.argv[1:]])}` (see its docstring); do not edit by hand.",
        f"Calibration: {args.num_samples} C4 documents x {args.seq_len} tokens (seed {args.seed}), as `benchmarks/run.py`.",
        f"WikiText-2 and C4 held-out: {args.eval_windows} windows of {args.eval_seq_len} tokens; KL(dense bf16 || row) per token on C4.",
        f"Zero-shot: lm-eval `acc` on the first {args.zeroshot_limit} items of each local task (rows without it: `-`). Models compressed in bf16;",
        "evaluated in float32 on the CPU, FP8 rows de-quantized by compressed-tensors with their activations fake-quantized to FP8.",
        "",
        "Commit of each row: " + ", ".join(sorted({f"`{row.get('commit', 'not recorded')}`" for row in rows.values()})) + ".",
        "",
        "| variant | WikiText-2 ppl | C4 ppl | KL to dense | " + " | ".join(ZEROSHOT_SHORT.values())
        + " | zero-shot mean | exactly 2:4 | vllm-2of4 export | compress s |",
        "|---" * (8 + len(ZEROSHOT_SHORT)) + "|",
    ]
    for name in VARIANTS:
        row = rows.get(name)
        if row is None:
            continue
        zeroshot = row.get("zeroshot", {})
        accs = [zeroshot.get(task) for task in ZEROSHOT_SHORT]
        mean = sum(accs) / len(accs) if accs and None not in accs else None
        exact = "-" if "groups_over_2of4" not in row else ("yes" if row["groups_over_2of4"] == 0 else f"no ({row['groups_over_2of4']} groups)")
        export = "ok" if "vllm_2of4_export_seconds" in row else "-"
        lines.append(f"| {row['label']} | {row['wikitext2_ppl']:.2f} | {row['c4_ppl']:.2f} | {row['kl']:.3f} | "
                     + " | ".join(fmt(acc, ".2f") for acc in accs)
                     + f" | {fmt(mean, '.3f')} | {exact} | {export} | {row['compress_seconds']:.0f} |")
    check = rows.get("end-to-end")
    if check is not None:
        lines += ["", f"End to end: `recipes/{check['recipe']}` in one oneshot run on the dense model "
                  f"({check['compress_seconds']:.0f} s) saved {'the same' if check['identical'] else 'DIFFERENT'} tensors "
                  f"as the row `{check['identical_to']}` (byte-for-byte); exactly 2:4: "
                  f"{'yes' if check['groups_over_2of4'] == 0 else 'no'}."]
    (args.output / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--zeroshot-limit", type=int, default=50)
    parser.add_argument("--zeroshot-rows", nargs="*", default=list(ZEROSHOT_ROWS), choices=list(VARIANTS),
                        help="rows that get zero-shot accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--end-to-end", action="store_true", help="also run the one-run permuted FP8 recipe and compare")
    parser.add_argument("--checkpoints", type=Path, default=Path.home() / ".cache/learned-permutation/fp8-checkpoints")
    parser.add_argument("--output", type=Path, default=REPO / "results" / "fp8")
    args = parser.parse_args()
    args.commit = commit()  # the code imported now is the code every row of this run measures
    args.checkpoints.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense_dir, calibration, c4_text, wikitext = build_data(args)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)  # every row starts from these weights
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    if not (args.checkpoints / "dense" / "config.json").is_file():
        dense.save_pretrained(args.checkpoints / "dense")
        tokenizer.save_pretrained(args.checkpoints / "dense")
    data = (calibration, c4_text, wikitext, dense.float().eval(), tokenizer)
    for name in VARIANTS:
        path = args.output / f"{name}.json"
        if not path.is_file():
            path.write_text(json.dumps(run_variant(args, name, data), indent=2) + "\n")
            write_report(args)
        print(f"{name}: done", flush=True)
    if args.end_to_end and not (args.output / "end-to-end.json").is_file():
        (args.output / "end-to-end.json").write_text(json.dumps(end_to_end(args, dense_dir, calibration), indent=2) + "\n")
    write_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
