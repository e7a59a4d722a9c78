"""The two-process scenarios of ``test_distributed.py``, in one torchrun launch (starting the processes
costs more than the runs): each saves its checkpoint under ``OUT/<scenario>``; the forced divergence
writes each rank's error to ``OUT/divergence/error-rank<r>.txt``.

    torchrun --standalone --nproc-per-node 2 tests/plugin/distributed_scenarios.py MODEL DATA OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from distributed_oneshot import prune, rank_rows  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from learned_permutation import LearnedPermutationModifier  # noqa: E402
from learned_permutation.plugin import search  # noqa: E402
from learned_permutation.plugin.distributed import init_torchrun_process_group, rank  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: E402

NUM_SAMPLES = 7  # over both ranks: 4 and 3 rows, so the statistics are weighted by unequal counts
SEQ_LEN = 32
PRUNERS = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}


def recipe(pruner: str, sync: bool = True) -> list:
    """The modifier (select, 2:4) before ``pruner`` at 2:4."""
    return [
        LearnedPermutationModifier(mask_structure="2:4", sync_pruner_statistics=sync),
        PRUNERS[pruner](sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"]),
    ]


def flip_unblocked_solutions(solve):
    """``solve`` with its permutation reversed at the sites without head blocks (residual, mlp)."""
    def flipped(*args, block_size=None, **kwargs):
        perm = solve(*args, block_size=block_size, **kwargs)
        return perm if block_size is not None else perm.flip(0)
    return flipped


def main(model: str, data: str, out: str) -> None:
    init_torchrun_process_group()
    out_dir = Path(out)
    for name, scenario in {
        "sparsegpt": recipe("sparsegpt"),
        "wanda_unsynced": recipe("wanda", sync=False),
        "sparsegpt_unsynced": recipe("sparsegpt", sync=False),
    }.items():
        prune(model, data, scenario, out_dir / name, NUM_SAMPLES, SEQ_LEN)
    # Loaded plainly, not by load_offloaded_model: the pipeline then shares rank 0's copy in CPU memory.
    # And both modifiers in one sequential pipeline, not each in its own (llm-compressor's default).
    rows = rank_rows(data, NUM_SAMPLES)
    oneshot(model=AutoModelForCausalLM.from_pretrained(model), tokenizer=AutoTokenizer.from_pretrained(model),
            recipe=recipe("wanda"), dataset=rows, num_calibration_samples=len(rows), max_seq_length=SEQ_LEN,
            shuffle_calibration_samples=False, pipeline="sequential", output_dir=str(out_dir / "wanda_cpu_shared"))
    if rank() == 1:  # this rank alone decides otherwise
        search.solve_site = flip_unblocked_solutions(search.solve_site)
    try:
        prune(model, data, [LearnedPermutationModifier(mask_structure="2:4", method="greedy")],
              out_dir / "divergence", NUM_SAMPLES, SEQ_LEN)
    except RuntimeError as error:
        (out_dir / "divergence").mkdir(parents=True, exist_ok=True)
        (out_dir / "divergence" / f"error-rank{rank()}.txt").write_text(str(error))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
