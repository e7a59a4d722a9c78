"""The modifier's own peak memory, with its passes run layer by layer in row chunks and as one batch.

Runs ``oneshot`` with the default ``LearnedPermutationModifier`` and Wanda 2:4 (so llm-compressor's
sequential pipeline places the model as in a real run) on a random-weight Llama shape once per
``--chunk-tokens`` setting, each in its own child process, side by
side in one invocation. ``all`` runs every decoder layer on the whole sample at once (what the passes
did before ``plugin/selection.py``'s ``LAYER_CHUNK_TOKENS``); a number runs each layer on that many
tokens at a time. Measured: the peak memory during ``PermutationSearch.run`` above what the process
held when it started (on a GPU ``torch.cuda.max_memory_allocated``; on a CPU the kernel's resident
high-water mark, reset through ``/proc/self/clear_refs``, with glibc returning every freed block over
1 MiB at once so resident memory follows live tensors), next to the bound of issue 12: one decoder
layer's fp32 weights plus the captured layer inputs (the sample's hidden states). With ``--live-tensors``
the run is also accounted tensor by tensor (``live_tensors.py``: exact on a CPU too, slower) and the
largest allocations alive at that peak are printed with the line that made them; with
``--function-times``, the seconds of the modifier's main functions (``MODIFIER_FUNCTIONS``).

    python benchmarks/layer_pass_memory.py                                   # Llama-3.2-1B layer shape, 4 layers
    python benchmarks/layer_pass_memory.py --shape 576,1536,4,9,3 --chunk-tokens all 1024 512
    python benchmarks/layer_pass_memory.py --chunk-tokens 512 --live-tensors    # what the peak is made of
    python benchmarks/layer_pass_memory.py --chunk-tokens 512 --function-times  # where the seconds go
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from function_times import FunctionTimes  # noqa: E402
from live_tensors import LiveTensors  # noqa: E402
from scale import child_result, random_llama  # noqa: E402

SEARCH, SELECTION = "learned_permutation.plugin.search", "learned_permutation.plugin.selection"
MODIFIER_FUNCTIONS = [
    f"{SEARCH}:scored_final_hidden", f"{SEARCH}:PermutationSearch._finish_layer", f"{SEARCH}:PermutationSearch._problem",
    "learned_permutation.math.solvers:SOLVERS[greedy]", "learned_permutation.math.solvers:SOLVERS[ria]",
    f"{SEARCH}:PermutationSearch._objectives", f"{SEARCH}:PermutationSearch._solve_residual",
    f"{SEARCH}:PermutationSearch._choose_configuration", f"{SEARCH}:fold_permutations",
    f"{SELECTION}:SimulatedPruning._pruned_forward", f"{SELECTION}:head_losses", f"{SELECTION}:layer_inputs",
    "learned_permutation.plugin.residual_sample:ReaderRowSample.add", "learned_permutation.plugin.statistics:InputStatistics.hook",
]
GLIBC_RETURNS_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def resident_mib(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process from ``/proc/self/status``, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import learned_permutation  # noqa: F401
    from learned_permutation import LearnedPermutationModifier
    from learned_permutation.plugin import search, selection
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (args.num_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    chunk = args.chunk_tokens[0]  # a child runs one setting
    selection.LAYER_CHUNK_TOKENS = ids.numel() if chunk == "all" else int(chunk)
    measured = {}
    run = search.PermutationSearch.run

    def measured_run(self, sample, device, *rest):
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
            before = resident_mib("VmRSS")
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if args.live_tensors:
                live = stack.enter_context(LiveTensors())
            if args.function_times:
                times = stack.enter_context(FunctionTimes(MODIFIER_FUNCTIONS))
            run(self, sample, device, *rest)
        if args.live_tensors:
            measured["live_peak_mib"] = live.peak / 2**20
            measured["at_peak"] = live.at_peak()[:12]
        if args.function_times:
            measured["function_times"] = times.rows()
        measured["seconds"] = time.perf_counter() - start
        if gpu:
            measured["extra_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            measured["extra_peak_mib"] = resident_mib("VmHWM") - before
        measured["permutations"] = {name: perm.tolist() for name, perm in self.permutations.items()}

    search.PermutationSearch.run = measured_run
    modifier = LearnedPermutationModifier(mask_structure="2:4")
    pruner = WandaPruningModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
    with tempfile.TemporaryDirectory() as output:
        oneshot(model=model, tokenizer=tokenizer, recipe=[modifier, pruner], dataset=dataset, output_dir=output,
                num_calibration_samples=len(ids), max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    sample_tokens = min(modifier.sample_tokens, ids.numel())
    layer = model.model.layers[0]
    print("RESULT " + json.dumps({
        **measured,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "layer_fp32_mib": sum(p.numel() for p in layer.parameters()) * 4 / 2**20,
        "layer_inputs_mib": sample_tokens * model.config.hidden_size * 4 / 2**20,
        "sample_tokens": sample_tokens,
    }))


def run_child(args, chunk_tokens: str) -> dict:
    command = [sys.executable, __file__, "--child", "--model", str(args.model), "--chunk-tokens", chunk_tokens,
               "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    command += ["--live-tensors"] * args.live_tensors + ["--function-times"] * args.function_times
    return child_result(command, GLIBC_RETURNS_FREED_MEMORY)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2048,8192,4,32,8", help="random Llama: hidden,intermediate,layers,heads,kv_heads")
    parser.add_argument("--chunk-tokens", nargs="+", default=["all", "512"],
                        help="tokens per decoder-layer call, 'all' for the whole sample at once")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--live-tensors", action="store_true",
                        help="also account every tensor (exact peak, and what it is made of; slower)")
    parser.add_argument("--function-times", action="store_true",
                        help="also time the modifier's main functions (the device drained at each boundary)")
    parser.add_argument("--output", type=Path, help="append the table to this markdown file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        args.model = random_llama(args.shape, Path(scratch) / "model")
        results = {chunk: run_child(args, chunk) for chunk in args.chunk_tokens}
    first = next(iter(results.values()))
    lines = [
        f"`python benchmarks/layer_pass_memory.py {' '.join(argv or sys.argv[1:])}`: random Llama {args.shape}, "
        f"{args.num_samples} x {args.seq_len} calibration tokens ({first['sample_tokens']} in the sample), "
        f"{first['device']}, {args.threads} threads",
        "",
        "| tokens per layer call | modifier s | extra peak MiB | bound MiB (layer fp32 + layer inputs) | same permutations as the first row |",
        "|---|---|---|---|---|",
    ]
    for chunk, result in results.items():
        bound = result["layer_fp32_mib"] + result["layer_inputs_mib"]
        same = "yes" if result["permutations"] == first["permutations"] else "no"
        lines.append(f"| {chunk} | {result['seconds']:.1f} | {result['extra_peak_mib']:.0f} | "
                     f"{bound:.0f} ({result['layer_fp32_mib']:.0f} + {result['layer_inputs_mib']:.0f}) | {same} |")
    for chunk, result in results.items():
        if "at_peak" in result:
            lines += ["", f"{chunk} tokens per layer call: tensors alive at the modifier's peak, "
                      f"{result['live_peak_mib']:.0f} MiB in all (allocations of 1 MiB or more by the line that made them)", "",
                      "| MiB | tensors | allocated at |", "|---|---|---|"]
            lines += [f"| {mib:.0f} | {count} | `{site}` |" for site, mib, count in result["at_peak"]]
        if "function_times" in result:
            lines += ["", f"{chunk} tokens per layer call: inclusive seconds of the modifier's functions "
                      "(nested rows overlap)", "", "| function | s | calls |", "|---|---|---|"]
            lines += [f"| `{label}` | {seconds:.2f} | {calls} |" for label, seconds, calls in result["function_times"]]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with args.output.open("a") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
