"""Files the modifier writes beside a saved checkpoint, and how to read them back.

``permutation_report.json`` says what each site's permutation did to the objective and how long it
took; ``permutations.safetensors`` holds the permutations themselves (int64, one tensor per site, keyed
by site name), so the dense model can be put in the same channel order: to audit per-layer pruning
error against the right dense weights, or to fold the same order into another copy of the model.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from compressed_tensors.distributed import is_source_process
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from learned_permutation.math import parse_mask_structure
from learned_permutation.structure import find_sites, fold_permutations

REPORT_FILE = "permutation_report.json"
PERMUTATIONS_FILE = "permutations.safetensors"


def write_artifacts_on_save(model: nn.Module, report: dict, permutations: dict[str, torch.Tensor]) -> None:
    """Make ``model.save_pretrained`` also write the report and the permutations.

    llm-compressor's ``oneshot`` saves after finalize, through the model's (already wrapped)
    ``save_pretrained``; wrapping it once more is how both files land next to recipe.yaml.
    A second call (a second modifier run on the same model) replaces what the wrapper writes.
    """
    if not hasattr(model.save_pretrained, "permutation_artifacts"):
        original_save = model.save_pretrained

        @functools.wraps(original_save)
        def save_with_artifacts(save_directory, *args, **kwargs):
            result = original_save(save_directory, *args, **kwargs)
            if not is_source_process():  # under torchrun llm-compressor saves from rank 0 only; so do we
                return result
            saved_report, saved_permutations = save_with_artifacts.permutation_artifacts
            directory = Path(save_directory)
            (directory / REPORT_FILE).write_text(json.dumps(saved_report, indent=2) + "\n")
            save_file({name: perm.contiguous() for name, perm in saved_permutations.items()},
                      str(directory / PERMUTATIONS_FILE))
            _index_single_weight_file(directory)
            return result

        model.save_pretrained = save_with_artifacts
    model.save_pretrained.permutation_artifacts = (report, {name: perm.to("cpu", torch.int64) for name, perm in permutations.items()})


def _index_single_weight_file(directory: Path) -> None:
    """Give a single-file checkpoint a weight index. Without one, vLLM loads every ``*.safetensors`` of
    the folder, ours too, and fails on its tensor names ("no module or parameter named 'residual'");
    with one it reads only the files the index names. transformers reads either."""
    weights, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if weights.is_file() and not index.exists():
        with safe_open(str(weights), framework="pt") as handle:
            names = sorted(handle.keys())
        index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, weights.name)}, indent=2) + "\n")


def fold_saved_permutations(model: nn.Module, checkpoint_dir: str | Path) -> list[str]:
    """Fold the permutations saved beside ``checkpoint_dir`` into ``model`` (for example the dense model
    the checkpoint was compressed from), in place; returns the site names folded.

    The dense model computes the same function afterwards, and its weights are in the checkpoint's
    channel order."""
    directory = Path(checkpoint_dir)
    report_path, permutations_path = directory / REPORT_FILE, directory / PERMUTATIONS_FILE
    if not (report_path.is_file() and permutations_path.is_file()):
        raise FileNotFoundError(
            f"{directory} has no {REPORT_FILE} and {PERMUTATIONS_FILE}; it was not saved by a recipe with "
            "LearnedPermutationModifier (or by an older version that did not save permutations)."
        )
    _, m = parse_mask_structure(json.loads(report_path.read_text())["mask_structure"])
    permutations = load_file(str(permutations_path))
    sites = {site.name: site for site in find_sites(model, m)}
    unknown = sorted(set(permutations) - set(sites))
    if unknown:
        raise ValueError(f"{permutations_path} names sites {unknown} that this model does not have")
    fold_permutations(model, {sites[name]: perm for name, perm in permutations.items()})
    return list(permutations)
