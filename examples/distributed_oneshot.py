"""2:4 pruning with channel permutations on several GPUs: one process per GPU, each calibrating on its
own slice of the data, one checkpoint saved by rank 0 (README, "Several GPUs").

    torchrun --standalone --nproc-per-node 4 examples/distributed_oneshot.py --model path/to/model \\
        --data calibration.txt --recipe recipes/sparsegpt_2of4_permuted.yaml --output-dir out/pruned

``--data``: a text file (split into paragraphs) or a parquet file with a ``text`` column; its first
``--num-samples`` rows calibrate, each rank taking a contiguous slice of them. The script slices them
itself: llm-compressor 0.14.0.1 offers to when every rank passes the same dataset, but then every rank
calibrates on the first slice (its sampler indexes the slice, its DataLoader the whole dataset;
``llmcompressor/datasets/utils.py``). The model is loaded once, by rank 0, into CPU memory the ranks
share, spilling to a temporary folder on disk beyond it (compressed-tensors' ``load_offloaded_model``
with ``device_map="auto_offload"``). Run with plain ``python`` instead of ``torchrun``, the same script
is the single-process run on all the rows.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch.distributed as dist
from compressed_tensors.offload import load_offloaded_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import learned_permutation  # noqa: F401  (registers LearnedPermutationModifier)
from learned_permutation.plugin.distributed import init_torchrun_process_group, rank, world_size
from learned_permutation.tools.data import file_dataset
from llmcompressor import oneshot

REPO = Path(__file__).resolve().parents[1]


def rank_rows(data: str | Path, num_samples: int):
    """This rank's contiguous slice of the first ``num_samples`` rows of ``data`` (all of them in one process)."""
    rows = file_dataset(data)
    rows = rows.select(range(min(num_samples, len(rows))))
    if len(rows) < world_size():
        raise ValueError(f"{len(rows)} calibration rows cannot give each of {world_size()} ranks one; "
                         "pass more rows (--num-samples, --data) or fewer processes")
    return rows.shard(world_size(), rank(), contiguous=True)


def prune(model: str | Path, data: str | Path, recipe, output_dir: str | Path, num_samples: int = 128,
          seq_len: int = 512):
    """One ``oneshot`` of ``recipe`` (a YAML path or modifiers) on ``model``; returns the pruned model.
    Call it on every rank, after the process group exists."""
    rows = rank_rows(data, num_samples)
    with tempfile.TemporaryDirectory() as offload_dir:
        with load_offloaded_model():
            loaded = AutoModelForCausalLM.from_pretrained(
                model, dtype="auto", device_map="auto_offload", offload_folder=offload_dir
            )
        pruned = oneshot(
            model=loaded,
            tokenizer=AutoTokenizer.from_pretrained(model),
            recipe=str(recipe) if isinstance(recipe, Path) else recipe,
            dataset=rows,
            num_calibration_samples=len(rows),
            max_seq_length=seq_len,
            shuffle_calibration_samples=False,  # llm-compressor's shuffle is unseeded: runs would differ
            output_dir=str(output_dir),
        )
        if dist.is_initialized():
            dist.barrier()  # rank 0's offload folder is every rank's until all are done
    return pruned


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved Hugging Face model directory with its tokenizer")
    parser.add_argument("--data", required=True, help="calibration text file or parquet file")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "sparsegpt_2of4_permuted.yaml"))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-samples", type=int, default=128, help="calibration rows, over all ranks")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration row")
    args = parser.parse_args(argv)
    init_torchrun_process_group()
    try:
        prune(args.model, args.data, args.recipe, args.output_dir, args.num_samples, args.seq_len)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
