"""What the permutation modifier costs next to the pruner it serves: wall time and peak memory.

For each pruner, two oneshot runs side by side in one invocation (this machine is noisy; compare
ratios, not absolute seconds): the pruner alone, and the default ``LearnedPermutationModifier``
followed by the same pruner. Each run is its own child process, so its peak resident memory
(``ru_maxrss``) is its own. Printed and written per run: oneshot wall time (model loading excluded),
the modifier's own seconds and per-phase seconds from ``permutation_report.json``, peak memory,
and for the pair: extra time, ratio to the pruner alone, extra peak memory next to one decoder
layer's fp32 weights plus the captured sample's activations. ``--modifier-fields`` runs the modifier
with other fields too (one more run per pruner each, against the same pruner-alone run).

    python benchmarks/scale.py --model ~/.cache/learned-permutation/smollm2-135m
    python benchmarks/scale.py --model ~/.cache/learned-permutation/smollm2-135m --pruners wanda \
        --modifier-fields '{}' '{"solver_args": {"greedy": {"sweeps": 3}}}'   # the default and a variant
    python benchmarks/scale.py --shape 2048,8192,4,32,8 --num-samples 16 --seq-len 256   # Llama-3.2-1B layer shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRUNERS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}


def random_llama(shape: str, directory: Path, vocab: int = 4096) -> Path:
    """A random-weight Llama of ``hidden,intermediate,layers,heads,kv_heads`` (vocabulary 4096 unless
    given) saved with the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from learned_permutation.tools.llama2c import EMBEDDED_MODEL_DIR

    hidden, intermediate, layers, heads, kv_heads = (int(x) for x in shape.split(","))
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def child(args) -> None:
    """One oneshot run; prints a JSON line with its wall time, peak memory and report."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import learned_permutation  # noqa: F401
    from learned_permutation import LearnedPermutationModifier
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(tokenizer.vocab_size, model.config.vocab_size), (args.num_samples, args.seq_len),
                        generator=generator)
    if args.data:
        from learned_permutation.tools.data import file_dataset
        texts = file_dataset(args.data)
        stream = [t for text in texts["text"][: 8 * args.num_samples] for t in tokenizer(text)["input_ids"]]
        if len(stream) < args.num_samples * args.seq_len:
            raise SystemExit(f"{args.data}: its first {8 * args.num_samples} texts hold {len(stream)} tokens, fewer than "
                             f"--num-samples x --seq-len = {args.num_samples * args.seq_len}; pass a longer file or fewer samples")
        ids = torch.tensor(stream[: args.num_samples * args.seq_len]).reshape(args.num_samples, args.seq_len)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    pruner_class = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.pruner]
    pruner = pruner_class(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
    modifier = LearnedPermutationModifier(mask_structure="2:4", **json.loads(args.fields or "{}"))
    recipe = ([modifier] if args.with_modifier else []) + [pruner]
    with tempfile.TemporaryDirectory() as output:
        start = time.perf_counter()
        oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=dataset,
                num_calibration_samples=len(ids), max_seq_length=args.seq_len, shuffle_calibration_samples=False)
        seconds = time.perf_counter() - start
        report = recipe[0].report() if args.with_modifier else None
    layer = model.model.layers[0]
    sample_tokens = min(recipe[0].sample_tokens, ids.numel()) if args.with_modifier else 0
    print("RESULT " + json.dumps({
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "layer_fp32_mib": sum(p.numel() for p in layer.parameters()) * 4 / 2**20,
        "sample_activation_mib": sample_tokens * model.config.intermediate_size * 4 / 2**20,
        "layers": model.config.num_hidden_layers,
        "report": report,
    }))


def run_child(args, pruner: str, with_modifier: bool, fields: str = "{}") -> dict:
    """One oneshot child: the pruner alone, or after the modifier with ``fields`` (JSON) on top of its defaults."""
    command = [sys.executable, __file__, "--child", "--model", str(args.model), "--pruner", pruner,
               "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    command += ["--with-modifier", "--fields", fields] if with_modifier else []
    command += ["--data", str(args.data)] if args.data else []
    return child_result(command)


def child_result(command: list[str], environment: dict | None = None) -> dict:
    """Run a benchmark child (offline, plus ``environment``) and parse the JSON of its last ``RESULT`` line."""
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, **(environment or {}), "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a saved model directory")
    source.add_argument("--shape", help="random Llama: hidden,intermediate,layers,heads,kv_heads")
    parser.add_argument("--data", type=Path, help="calibration text/parquet (default: random token ids)")
    parser.add_argument("--pruners", nargs="+", default=list(PRUNERS), choices=list(PRUNERS))
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, help="append the table to OUTPUT.md and the rows to OUTPUT.jsonl")
    parser.add_argument("--modifier-fields", nargs="+", default=["{}"],
                        help="one modifier run per JSON object of LearnedPermutationModifier fields ('{}': the default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pruner", help=argparse.SUPPRESS)
    parser.add_argument("--with-modifier", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fields", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        if args.shape:
            args.model = random_llama(args.shape, Path(scratch) / "model")
        name = args.shape and f"random Llama {args.shape}" or args.model.name
        rows = []
        for pruner in args.pruners:
            alone = run_child(args, pruner, False)
            for fields in args.modifier_fields:
                permuted = run_child(args, pruner, True, fields)
                rows.append({"model": name, "pruner": pruner, "modifier_fields": json.loads(fields),
                             "alone": alone, "with_modifier": permuted})
                print(table_row(rows[-1]), flush=True)
    device = rows[0]["alone"]["device"] if rows else "cpu"
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d}, {platform.node()}, {os.cpu_count()} CPUs, {device}, "
              f"{args.num_samples} x {args.seq_len} calibration tokens, {args.threads} threads; "
              f"`python benchmarks/scale.py {' '.join(argv or sys.argv[1:])}`")
    text = "\n".join([header, "", TABLE_HEADER, *map(table_row, rows)]) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.parent.joinpath(args.output.name + ".md").open("a") as handle:
            handle.write("\n" + text)
        with args.output.parent.joinpath(args.output.name + ".jsonl").open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return 0


TABLE_HEADER = (
    "| model | pruner | pruner alone s | with modifier s | extra s | extra / pruner | modifier report s "
    "| phases s | peak MiB alone / with | extra MiB | one layer fp32 + sample MiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(row: dict) -> str:
    alone, permuted = row["alone"], row["with_modifier"]
    extra = permuted["seconds"] - alone["seconds"]
    report = permuted["report"]
    phases = ", ".join(f"{k} {v:.1f}" for k, v in report["phase_seconds"].items())
    bound = permuted["layer_fp32_mib"] + permuted["sample_activation_mib"]
    fields = row.get("modifier_fields")
    pruner = row["pruner"] + (f" (modifier {json.dumps(fields)})" if fields else "")
    return (f"| {row['model']} | {pruner} | {alone['seconds']:.1f} | {permuted['seconds']:.1f} | {extra:.1f} | "
            f"{extra / alone['seconds']:.2f}x | {report['total_seconds']:.1f} | {phases} | "
            f"{alone['peak_rss_mib']:.0f} / {permuted['peak_rss_mib']:.0f} | "
            f"{permuted['peak_rss_mib'] - alone['peak_rss_mib']:.0f} | {bound:.0f} |{gpu_memory(alone, permuted)}")


def gpu_memory(alone: dict, permuted: dict) -> str:
    """Peak GPU memory alone / with and the difference, as an extra cell when the runs had a GPU."""
    if not alone.get("peak_gpu_mib"):
        return ""
    return (f" GPU peak {alone['peak_gpu_mib']:.0f} / {permuted['peak_gpu_mib']:.0f} MiB "
            f"(extra {permuted['peak_gpu_mib'] - alone['peak_gpu_mib']:.0f}) |")


if __name__ == "__main__":
    sys.exit(main())
