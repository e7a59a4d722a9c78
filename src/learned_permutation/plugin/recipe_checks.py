"""What ``LearnedPermutationModifier`` checks and resolves before calibration runs.

Everything here runs at initialisation, before the first forward pass, or (``check_recipe``) from
a recipe and a config.json alone, before the model is loaded (the CLI). Each check raises a
``ValueError`` that names the problem and the fix.

Target resolution mirrors llm-compressor 0.14's pruners (``SparsityModifierBase.on_calibration_start``
in ``llmcompressor/modifiers/pruning/sparsegpt/sgpt_base.py``): ``targets`` name *containers*, every
prunable layer inside a container is pruned, and ``ignore`` is matched against the name
``f"{container}.{name inside it}"``; for a container that is itself a Linear that name ends with a
dot (``"lm_head."``), which is why a bare ``"lm_head"`` in ``ignore`` matches nothing.
"""

from __future__ import annotations

import inspect

import torch
from compressed_tensors.utils import match_named_modules, match_targets
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES, SparsityModifierBase

from learned_permutation.math import SCORE_KINDS, SOLVERS, parse_mask_structure
from learned_permutation.structure import check_foldable_config
from learned_permutation.structure.offload import read_parameter, stored_tensor

__all__ = [
    "MIN_CALIBRATION_TOKENS",
    "RecipeCheckError",
    "PRUNER_SCORES",
    "check_calibration_tokens",
    "check_finite_weights",
    "check_recipe",
    "check_solver_args",
    "following_pruner",
    "pruned_modules",
    "resolve_score",
    "shuffles_unseeded",
]

class RecipeCheckError(ValueError):
    """An input the modifier refuses before calibration (recipe, weights, calibration data); the message
    names the fix. The CLI prints it as one ``error:`` line."""


PRUNER_SCORES = {"SparseGPTModifier": "sparsegpt", "WandaPruningModifier": "wanda"}

# Below this many calibration tokens the per-channel statistics say nothing about the model's inputs
# (one empty document calibrates on a single BOS token).
MIN_CALIBRATION_TOKENS = 128


def pruned_modules(model: nn.Module, targets: str | list[str], ignore: list[str]) -> dict[str, nn.Module]:
    """The modules a SparseGPT/Wanda pruner with these ``targets`` and ``ignore`` prunes, by the name
    it matches ``ignore`` against (see the module docstring), in its order."""
    pruned = {}
    for container_name, container in match_named_modules(model, targets):
        for name, module in match_named_modules(container, PRUNABLE_LAYER_TYPES):
            full_name = f"{container_name}.{name}"
            if match_targets(full_name, module, ignore) or isinstance(module, nn.Embedding):
                continue
            pruned.setdefault(full_name, module)
    return pruned


def following_pruner(modifiers: list, modifier) -> SparsityModifierBase | None:
    """The first SparseGPT/Wanda-style pruner after ``modifier`` in ``modifiers``; ValueError when a
    pruner comes before it or prunes with another ``mask_structure``."""
    position = next((i for i, m in enumerate(modifiers) if m is modifier), None)
    pruners = [(i, m) for i, m in enumerate(modifiers) if isinstance(m, SparsityModifierBase)]
    if position is not None:
        earlier = [type(m).__name__ for i, m in pruners if i < position]
        if earlier:
            raise RecipeCheckError(
                f"{type(modifier).__name__} is placed after {earlier[0]} in the recipe. The pruner would "
                f"prune before the permutation exists; move {type(modifier).__name__} before it."
            )
    pruner = next((m for i, m in pruners if position is None or i > position), None)
    if pruner is not None and pruner.mask_structure != modifier.mask_structure:
        raise RecipeCheckError(
            f"mask_structure mismatch: {type(modifier).__name__} has \"{modifier.mask_structure}\" but "
            f'{type(pruner).__name__} has "{pruner.mask_structure}". The permutation is learned for one '
            "N:M pattern; set both to the same value."
        )
    return pruner


def resolve_score(score: str, pruner) -> str:
    """``score``, with ``auto`` replaced by the score of the pruner that follows (``wanda`` without one)."""
    if score != "auto":
        return score
    if pruner is None:
        return "wanda"
    kind = PRUNER_SCORES.get(type(pruner).__name__)
    if kind is None:
        raise RecipeCheckError(
            f"score='auto' cannot infer a score for {type(pruner).__name__}; set score to one "
            f"of {sorted(SCORE_KINDS)}."
        )
    return kind


def check_solver_args(method: str, solver_args: dict) -> None:
    """Unknown ``solver_args`` keys fail at recipe parsing, with the valid ones, instead of as a
    TypeError after the statistics pass. ``seed`` is the modifier's own field."""
    valid = [
        name
        for name, parameter in inspect.signature(SOLVERS[method]).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "seed"
    ]
    unknown = sorted(set(solver_args) - set(valid))
    if unknown:
        hint = " (set the modifier's own `seed` field instead)" if "seed" in unknown else ""
        raise ValueError(
            f"solver_args {unknown} are not arguments of the {method!r} solver{hint}; "
            f"valid keys: {valid or 'none'}."
        )


def check_recipe(modifiers: list, config) -> None:
    """Every check that needs only the recipe's modifiers and the model's config (config.json):
    for each permutation modifier, recipe order, mask structure, score, architecture and
    divisibility of its sites. The CLI calls it before loading the model."""
    from learned_permutation.plugin.modifier import LearnedPermutationModifier

    for modifier in modifiers:
        if isinstance(modifier, LearnedPermutationModifier):
            resolve_score(modifier.score, following_pruner(modifiers, modifier))
            check_foldable_config(config, parse_mask_structure(modifier.mask_structure)[1], modifier.sites)


def check_finite_weights(model: nn.Module) -> None:
    """NaN/inf in any weight would surface later as NaN statistics of some other layer; name it now."""
    for module_name, module in model.named_modules():
        for name in list(module._parameters):
            if stored_tensor(module, name) is None:
                continue
            if not torch.isfinite(read_parameter(module, name, "cpu")).all():
                tensor = f"{module_name}.{name}" if module_name else name
                raise RecipeCheckError(
                    f"the model's weight {tensor} contains NaN or inf; the checkpoint is damaged or was "
                    "saved from a diverged run. Fix or re-export the checkpoint before pruning it."
                )


def check_calibration_tokens(dataloader: DataLoader | None) -> int:
    """The number of calibration tokens (non-padding); ValueError below ``MIN_CALIBRATION_TOKENS``."""
    tokens = 0
    for batch in dataloader or ():
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    if tokens < MIN_CALIBRATION_TOKENS:
        raise RecipeCheckError(
            f"the calibration data holds {tokens} tokens, fewer than the {MIN_CALIBRATION_TOKENS} that "
            "LearnedPermutationModifier needs to estimate channel statistics (empty or near-empty texts?). "
            "Pass more or longer calibration samples: dataset=..., num_calibration_samples=..., "
            "max_seq_length=... in oneshot()."
        )
    return tokens


def shuffles_unseeded(dataloader: DataLoader | None) -> bool:
    """Whether calibration runs in a different order every run: llm-compressor's default
    ``shuffle_calibration_samples=True`` samples with a ``RandomSampler`` that has no generator. A
    modifier cannot seed it: ``state.data.calib`` is a deep copy of the dataloader the pipelines iterate
    (``State.update(copy_data=True)`` in ``llmcompressor/core/state.py``)."""
    sampler = getattr(dataloader, "sampler", None)
    return isinstance(sampler, RandomSampler) and sampler.generator is None
