"""Keep other modifiers' calibration statistics consistent with a folded permutation.

In llm-compressor's ``sequential`` pipeline every modifier hooks the same calibration pass,
so when our modifier folds a layer's permutation at ``sequential_epoch_end`` the pruner
that runs next has already accumulated input statistics in the *old* column order. They
must be re-indexed with the same column permutation. Which attribute holds what is
llm-compressor implementation detail, recorded here as data per modifier class.
(``pipeline="independent"``, the default, runs each modifier in its own pass and needs none
of this.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["KNOWN_CALIBRATION_STATE", "reindex_calibration_state", "UnknownCalibratingModifierError"]


@dataclass(frozen=True)
class CalibrationState:
    """Dict attributes of a modifier holding per-module input statistics, by layout."""

    square: tuple[str, ...] = ()  # c x c matrices over input columns (Hessians)
    vector: tuple[str, ...] = ()  # length-c vectors over input columns


KNOWN_CALIBRATION_STATE: dict[str, CalibrationState] = {
    "SparseGPTModifier": CalibrationState(square=("_hessians",)),
    "WandaPruningModifier": CalibrationState(vector=("_row_scalars",)),
    "GPTQModifier": CalibrationState(square=("_hessians",)),
}


class UnknownCalibratingModifierError(RuntimeError):
    pass


def _hooked_modules(modifier) -> set[int]:
    """ids of the hook dicts that ``modifier`` registered into (one per hooked module)."""
    owners = set()
    for handle in getattr(modifier, "_hooks", ()):
        ref = handle.hooks_dict_ref()
        if ref is not None:
            owners.add(id(ref))
    return owners


def _module_is_hooked_by(module: nn.Module, modifier) -> bool:
    owners = _hooked_modules(modifier)
    hook_dicts = (module._forward_hooks, module._forward_pre_hooks)
    return any(id(d) in owners for d in hook_dicts)


def reindex_calibration_state(
    modifiers, column_permutations: dict[nn.Module, torch.Tensor], names: dict[nn.Module, str]
) -> list[str]:
    """Permute every known modifier's statistics of the given modules; return what was touched.

    Raises :class:`UnknownCalibratingModifierError` when a modifier we do not know hooks a
    permuted module: its statistics would silently refer to the wrong columns.
    """
    touched = []
    for modifier in modifiers:
        kind = type(modifier).__name__
        layout = KNOWN_CALIBRATION_STATE.get(kind)
        if layout is None:
            hooked = [names[m] for m in column_permutations if _module_is_hooked_by(m, modifier)]
            if hooked:
                raise UnknownCalibratingModifierError(
                    f"{kind} collects calibration statistics on {hooked}, which "
                    "LearnedPermutationModifier permutes in the same sequential pass, and we do "
                    f"not know how to re-index {kind}'s statistics. Run oneshot with "
                    "pipeline='independent' (each modifier then calibrates on the already "
                    "permuted model), or use one of: " + ", ".join(sorted(KNOWN_CALIBRATION_STATE))
                )
            continue
        for module, perm in column_permutations.items():
            for attribute in layout.square:
                store = getattr(modifier, attribute)
                if module in store:
                    index = perm.to(store[module].device)
                    store[module] = store[module][index][:, index]
                    touched.append(f"{kind}.{attribute}[{names[module]}]")
            for attribute in layout.vector:
                store = getattr(modifier, attribute)
                if module in store:
                    store[module] = store[module][perm.to(store[module].device)]
                    touched.append(f"{kind}.{attribute}[{names[module]}]")
    return touched
