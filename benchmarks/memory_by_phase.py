"""Resident memory of a permutation-only oneshot, sampled every 0.1 s and printed beside the modifier's log.

Shows where the modifier's memory goes phase by phase (one line per folded site, with the peak RSS so
far). Run it twice, once with glibc's defaults and once with
``MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576``, to tell memory that is kept from heap
fragmentation:

    python benchmarks/memory_by_phase.py ~/.cache/learned-permutation/smollm2-135m --sites mlp attn_vo --sample-tokens 2048
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import psutil
import torch
from datasets import Dataset
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer

import learned_permutation  # noqa: F401
from learned_permutation import LearnedPermutationModifier
from llmcompressor import oneshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--sites", nargs="+", default=["residual", "mlp", "attn_vo"])
    parser.add_argument("--method", default="select")
    parser.add_argument("--sample-tokens", type=int, default=8192)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(2)
    process, samples, marks, running = psutil.Process(os.getpid()), [], [], [True]

    def sample():
        while running[0]:
            samples.append((time.time(), process.memory_info().rss / 2**20))
            time.sleep(0.1)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = torch.randint(3, tokenizer.vocab_size, (args.num_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    logger.add(lambda message: marks.append((time.time(), message.record["message"][:70])), level="INFO")
    threading.Thread(target=sample, daemon=True).start()
    start = time.time()
    modifier = LearnedPermutationModifier(mask_structure="2:4", sites=args.sites, method=args.method,
                                          sample_tokens=args.sample_tokens)
    oneshot(model=model, tokenizer=tokenizer, recipe=[modifier], dataset=dataset, num_calibration_samples=len(ids),
            max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    running[0] = False
    for moment, message in marks:
        seen = [rss for when, rss in samples if when <= moment]
        print(f"{moment - start:7.1f} s  peak {max(seen, default=0):7.0f} MiB  {message}")
    print(f"wall {time.time() - start:.1f} s, peak {max(rss for _, rss in samples):.0f} MiB, "
          f"phases {modifier.report()['phase_seconds']}")


if __name__ == "__main__":
    main()
