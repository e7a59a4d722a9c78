"""Serve an exported checkpoint with vLLM and measure generation throughput.

Run it in a vLLM environment, not the project's (vLLM pins its own torch, transformers and
compressed-tensors; see docs/serving.md):

    # 2:4 kernels: vLLM 0.18.1 on an H100/H200, checkpoint exported with --format vllm-2of4
    ~/venvs/vllm-0.18.1/bin/python examples/serve_vllm.py out/model-vllm-2of4
    # dense kernels, any vLLM (0.19+ has no 2:4 kernels): checkpoint exported with --format plain
    ~/venvs/vllm-0.33.0/bin/python examples/serve_vllm.py out/model-plain

Running both exports of one model on the same GPU with vLLM 0.18.1 compares 2:4 and dense speed.
The script imports nothing of learned_permutation: a served checkpoint needs no custom code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = [
    "Once upon a time, there was a little",
    "The capital of France is",
    "Structured sparsity makes matrix multiplication",
    "In the morning the children went to the",
]


def describe(checkpoint: Path) -> str:
    sparsity = (json.loads((checkpoint / "config.json").read_text()).get("quantization_config") or {}).get("sparsity_config")
    if sparsity:
        return f"{sparsity['format']} {sparsity['sparsity_structure']} (vLLM 0.18.1 runs its CUTLASS 2:4 kernels on Hopper)"
    return "plain dense checkpoint (dense kernels; 2:4 zeros give no speed-up)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="folder written by `learned-permutation export`")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="prompts per timed batch (PROMPTS repeated)")
    parser.add_argument("--dtype", default="auto", help="auto reads config.json (the export writes bf16/fp16)")
    args = parser.parse_args()

    import vllm
    from vllm import LLM, SamplingParams

    print(f"vLLM {vllm.__version__}; {args.checkpoint}: {describe(args.checkpoint)}")
    llm = LLM(model=str(args.checkpoint), dtype=args.dtype, enforce_eager=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, greedy)):
        print(f"{prompt!r} -> {output.outputs[0].text[:120]!r}")

    batch = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    llm.generate(batch, greedy)  # warm-up: CUDA graphs, allocator
    start = time.perf_counter()
    outputs = llm.generate(batch, greedy)
    seconds = time.perf_counter() - start
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    print(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.0f} tokens/s (batch {args.batch})")


if __name__ == "__main__":
    main()
