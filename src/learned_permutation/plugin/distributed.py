"""The modifier under torchrun: one process per GPU, each calibrating on its own slice of the data.

llm-compressor 0.14.0.1 gives each rank a slice of the calibration set (``llmcompressor/datasets/utils.py``)
and saves from rank 0 only. Two things keep such a run equal to one process on the union of the slices:

1. The same decisions on every rank. Every rank gathers all ranks' calibration rows (token ids: small),
   so ``calibration_sample``, which takes rows in hash order, draws the sample one process would draw
   from the union; the search then decides from identical inputs, and ``check_same_permutations``
   compares a digest of every site's permutation across ranks, so a divergence is an error, never a
   silently inconsistent model.
2. Whole statistics for the pruner. SparseGPT's Hessians and Wanda's input norms are running means over
   each rank's own batches, and 0.14.0.1 does not reduce them across ranks (GPTQ reduces its Hessians,
   ``llmcompressor/modifiers/gptq/base.py``; SparseGPT and Wanda do not), so each rank would prune from
   its slice. ``sync_statistics_before_compressing`` makes the pruner reduce them to the mean over all
   ranks' samples just before it compresses.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from compressed_tensors.distributed import init_dist, is_distributed
from compressed_tensors.utils import patch_attr
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

from learned_permutation.plugin.recipe_checks import RecipeCheckError
from learned_permutation.structure.offload import write_parameter

__all__ = [
    "all_ranks_batches",
    "check_pruner_can_sync",
    "check_same_permutations",
    "init_torchrun_process_group",
    "rank",
    "reduce_pruner_statistics",
    "sync_statistics_before_compressing",
    "world_size",
]

# The pruners whose statistics can be reduced, and the private dict that holds each one's running means
# (next to ``_num_samples``, the batch rows each mean is over).
RUNNING_MEANS = {SparseGPTModifier: "_hessians", WandaPruningModifier: "_row_scalars"}


def world_size() -> int:
    """Processes in the run: the process group's size, 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def init_torchrun_process_group() -> bool:
    """Under torchrun (``WORLD_SIZE`` set), initialise its process group and return True; otherwise
    return False (a single-process run). With an accelerator this is compressed-tensors' ``init_dist``
    (NCCL on CUDA, one device per local rank); ``init_dist`` needs an accelerator, so a CPU-only
    machine gets gloo."""
    if "WORLD_SIZE" not in os.environ:
        return False
    if torch.accelerator.is_available():
        init_dist()
    else:
        dist.init_process_group("gloo")
    return True


def all_ranks_batches(batches: Iterable[dict]) -> Iterable[dict]:
    """Under a process group, every rank's calibration batches (``input_ids`` and ``attention_mask``
    on the CPU), the same list on every rank; without one, ``batches`` unchanged."""
    if not is_distributed():
        return batches
    local = [
        {key: batch[key].cpu() for key in ("input_ids", "attention_mask") if batch.get(key) is not None}
        for batch in batches
    ]
    gathered: list[list[dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [batch for rank_batches in gathered for batch in rank_batches]


def check_same_permutations(permutations: dict[str, torch.Tensor]) -> None:
    """RuntimeError naming the sites whose permutation differs between ranks (no-op without a process
    group). Ranks decide from identical inputs, so a difference means a nondeterministic kernel or ranks
    that do not run the same model, recipe or software."""
    if not is_distributed():
        return
    digests = {name: hashlib.sha256(perm.to("cpu", torch.int64).numpy().tobytes()).hexdigest()
               for name, perm in permutations.items()}
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    sites = sorted({name for rank_digests in gathered for name in rank_digests})
    differing = [name for name in sites if len({rank_digests.get(name) for rank_digests in gathered}) > 1]
    if differing:
        raise RuntimeError(
            f"LearnedPermutationModifier: the {len(gathered)} ranks decided different permutations at sites "
            f"{differing}, although every rank decides from the same calibration sample. Run the same model, "
            "recipe and software on every rank; on GPUs, torch.use_deterministic_algorithms(True) rules out "
            "nondeterministic kernels. Nothing was saved."
        )


def check_pruner_can_sync(pruner) -> None:
    """RecipeCheckError, before any calibration, for a pruner whose statistics cannot be made whole."""
    if _running_means_class(pruner) is None:
        raise RecipeCheckError(
            f"sync_pruner_statistics: {type(pruner).__name__}'s statistics cannot be reduced across ranks (only "
            f"{sorted(cls.__name__ for cls in RUNNING_MEANS)}'s); set sync_pruner_statistics: false to let each "
            "rank prune from its own slice of the data."
        )
    if pruner.sparsity_profile == "owl":
        raise RecipeCheckError(
            "sync_pruner_statistics: OWL layer sparsities (sparsity_profile: owl) are inferred from each "
            "rank's own slice of the data, so ranks would prune different layers differently; use a fixed "
            "sparsity under torchrun, or set sync_pruner_statistics: false."
        )


def reduce_pruner_statistics(pruner) -> None:
    """Replace each rank's running means by the mean over every rank's samples: the sum over ranks of
    ``samples x mean``, divided by all ranks' samples. That is what one process accumulating every
    batch holds (llm-compressor's running mean is a sum over samples divided by their count), up to
    the order of the additions."""
    means = getattr(pruner, RUNNING_MEANS[_running_means_class(pruner)])
    counts = pruner._num_samples
    by_name = {pruner._module_names[module]: module for module in counts}
    names = sorted(by_name)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    if any(rank_names != names for rank_names in gathered):
        raise RuntimeError(
            f"{type(pruner).__name__}: the ranks calibrated different modules before compressing "
            f"({[len(rank_names) for rank_names in gathered]} modules per rank), so their statistics cannot be "
            "reduced; every rank needs calibration data and the same model and recipe."
        )
    modules = [by_name[name] for name in names]
    samples = torch.tensor([counts[module] for module in modules], dtype=torch.float64)
    totals = samples.clone()
    _sum_over_ranks(totals)
    for module, rank_samples, total in zip(modules, samples.tolist(), totals.tolist()):
        mean = means[module]
        mean.mul_(rank_samples)
        _sum_over_ranks(mean)
        mean.div_(total)
        counts[module] = int(total)


def sync_statistics_before_compressing(pruner) -> Callable[[], None]:
    """Make ``pruner`` reduce its statistics across ranks each time it compresses; returns the undo.

    The pruner's own method is wrapped because no other modifier sees the event it compresses on: in
    llm-compressor's default ``independent`` pipeline each modifier runs its own calibration with only
    itself in the recipe (``llmcompressor/pipelines/independent/pipeline.py``). The wrapper lives on this
    instance only and is not a pydantic field, so the saved recipe is unchanged."""
    compress = pruner.compress_modules
    pruner_module = sys.modules[_running_means_class(pruner).__module__]

    def reduce_then_compress():
        reduce_pruner_statistics(pruner)
        # Every rank now prunes to the same weights; where the ranks share one copy of them, the source
        # rank writes it alone, and no rank reads a weight while it is written (structure/offload.py).
        with patch_attr(pruner_module, "update_offload_parameter", write_parameter):
            compress()

    object.__setattr__(pruner, "compress_modules", reduce_then_compress)
    return lambda: vars(pruner).pop("compress_modules", None)


def _running_means_class(pruner) -> type | None:
    return next((cls for cls in RUNNING_MEANS if isinstance(pruner, cls)), None)


def _sum_over_ranks(tensor: torch.Tensor) -> None:
    """In-place all-reduce sum; NCCL cannot reduce CPU tensors (offloaded Hessians), so those go
    through the accelerator."""
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        on_device = tensor.to(torch.accelerator.current_accelerator())
        dist.all_reduce(on_device)
        tensor.copy_(on_device)
    else:
        dist.all_reduce(tensor)
