"""``LearnedPermutationModifier``: learn channel permutations during one-shot calibration
and fold them into the weights, so the N:M pruner that follows keeps more of what matters.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from compressed_tensors.utils import match_named_modules, match_targets
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator
from torch import nn
from tqdm import tqdm

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.dev import get_main_device
from llmcompressor.utils.helpers import calibration_forward_context

from learned_permutation.plugin.artifacts import write_artifacts_on_save
from learned_permutation.plugin.pruner_state import reindex_calibration_state
from learned_permutation.plugin.selection import SimulatedPruning, packed_batches
from learned_permutation.plugin.statistics import InputStatistics, check_finite_statistics
from learned_permutation.math import (
    SCORE_KINDS,
    parse_mask_structure,
    reconstruction_error,
    solve_permutation,
)
from learned_permutation.structure import PermutationSite, find_sites, fold_permutation, mapping_for

__all__ = ["LearnedPermutationModifier"]

SITE_KINDS = ("residual", "mlp", "attn_vo")
PRUNER_SCORES = {"SparseGPTModifier": "sparsegpt", "WandaPruningModifier": "wanda"}


class LearnedPermutationModifier(Modifier):
    """
    Learns input-channel permutations that make N:M pruning keep more of what matters,
    and folds them into the weights: the saved checkpoint is an ordinary dense checkpoint
    whose pruned Linears are exactly N:M in storage order, and the dense model's function
    is unchanged by the permutation. Place it before the pruner, with the same
    ``mask_structure``; ``import learned_permutation`` registers it for YAML recipes.

    Sample yaml:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        LearnedPermutationModifier:
          mask_structure: "2:4"
          method: learned
        SparseGPTModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
    ```

    Lifecycle:

    - on_initialize
        - check the architecture, recipe order, mask structure and calibration data
        - discover the permutation sites (residual, per-layer mlp and attn_vo)
    - on_calibration_start
        - residual site: one forward pass over the calibration data gathers the input
          energy of every targeted Linear, then its permutation is solved and folded
          (before any pruner has seen an activation)
        - register hooks that accumulate ``X^T X`` at each down_proj / o_proj input (and,
          for ``learned``, the input energy of every targeted Linear)
    - on_sequential_epoch_end
        - for each layer just calibrated: solve the mlp and attn_vo permutations, fold
          them, and re-index statistics that a pruner in the same pass already holds
    - with ``method: learned`` (and ``end_to_end``) each site's candidates (identity, ria, greedy, learned;
      ``restarts`` seeds of the last two for the residual site) are ranked by the
      calibration loss of the model with the site's Linears pruned in simulation (all
      targeted Linears for the residual site, the layer's own for the others), one forward
      pass per candidate, and the best is folded (``learned_permutation.plugin.selection``)
    - on_calibration_end
        - remove hooks
    - on_finalize
        - log a summary; ``model.save_pretrained`` also writes ``permutation_report.json``
          and ``permutations.safetensors`` (see ``learned_permutation.plugin.artifacts``)

    :param mask_structure: ``"N:M"`` pattern the pruner will apply; must equal the
        pruner's. Quote it in YAML (unquoted ``2:4`` parses as the number 124).
    :param method: solver: ``learned`` (Sinkhorn-relaxed permutation learning on the layer-wise
        objective, then the end-to-end choice described above), ``greedy`` (channel swaps between groups),
        ``ria`` (RIA's heuristic) or ``identity`` (no permutation; a control).
    :param sites: which permutation sites to learn: any of ``residual`` (one permutation
        of the hidden dimension for the whole model), ``mlp`` (per-layer intermediate
        channels, consumed by down_proj) and ``attn_vo`` (per-layer, within each attention
        head, consumed by o_proj). Default: all.
    :param score: importance score the objective prunes by: ``auto`` (mirror the pruner
        that follows: SparseGPT -> ``sparsegpt``, Wanda -> ``wanda``; ``wanda`` when no
        pruner follows), or one of ``magnitude``, ``wanda``, ``ria``, ``sparsegpt``.
    :param targets: Linear modules whose N:M pruning the permutation optimises. Default:
        the targets of the pruner that follows (``["Linear"]`` without one).
    :param ignore: modules excluded from the objective. Default: the pruner's ignore list
        (``["re:.*lm_head"]`` without one: the head is almost never pruned).
    :param solver_args: extra keyword arguments for the solver (see
        ``learned_permutation.math.solve_permutation``), e.g. ``{steps: 200}``.
    :param restarts: ``method: learned`` only: seeds (``seed``, ``seed + 1``, ...) of the greedy
        and learned residual-site candidates (0: identity and ria only); per-layer sites try one.
    :param end_to_end: ``method: learned`` only: choose each site among candidates by the
        simulated-pruning calibration loss (default). ``false`` keeps the learned solver's
        layer-wise result: no extra forward passes, but on the models in ``docs/results.md``
        its end-to-end quality is a lottery.
    :param seed: seed for every random choice of the solvers.
    """

    requires_calibration_data: bool = True

    mask_structure: str = "2:4"
    method: Literal["learned", "greedy", "ria", "identity"] = "learned"
    sites: list[Literal["residual", "mlp", "attn_vo"]] = Field(default_factory=lambda: list(SITE_KINDS))
    score: str = "auto"
    targets: str | list[str] | None = None
    ignore: list[str] | None = None
    solver_args: dict[str, Any] = Field(default_factory=dict)
    restarts: int = Field(default=1, ge=0)
    end_to_end: bool = True
    seed: int = 0

    _n: int = PrivateAttr()
    _m: int = PrivateAttr()
    _score_kind: str = PrivateAttr()
    _targets: list[str] = PrivateAttr()
    _ignore: list[str] = PrivateAttr()
    _names: dict[nn.Module, str] = PrivateAttr(default_factory=dict)
    _residual: PermutationSite | None = PrivateAttr(default=None)
    _pending: list[PermutationSite] = PrivateAttr(default_factory=list)
    _layer_stats: InputStatistics = PrivateAttr(default_factory=lambda: InputStatistics(full=True))
    _energy: InputStatistics = PrivateAttr(default_factory=lambda: InputStatistics(full=False))
    _pruned: list[nn.Linear] = PrivateAttr(default_factory=list)
    _batches: list[dict] = PrivateAttr(default_factory=list)
    _report: list[dict] = PrivateAttr(default_factory=list)
    _permutations: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)

    @field_validator("mask_structure", mode="before")
    @classmethod
    def _check_mask_structure(cls, value):
        if not isinstance(value, str):
            raise ValueError(
                f"mask_structure must be a string like \"2:4\", got {value!r}. In YAML, quote it: "
                'mask_structure: "2:4" (unquoted, YAML reads 2:4 as the number 124).'
            )
        parse_mask_structure(value)
        return value

    @field_validator("sites")
    @classmethod
    def _check_sites(cls, value):
        if not value:
            raise ValueError(f"sites must name at least one of {list(SITE_KINDS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"sites lists a site kind twice: {value}")
        return value

    @field_validator("score")
    @classmethod
    def _check_score(cls, value):
        if value != "auto" and value not in SCORE_KINDS:
            raise ValueError(f"score must be 'auto' or one of {sorted(SCORE_KINDS)}, got {value!r}")
        return value

    # ------------------------------------------------------------------ lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        mapping_for(model)  # unsupported architectures fail here, by name
        self._n, self._m = parse_mask_structure(self.mask_structure)
        pruner = self._following_pruner()
        self._score_kind = self._resolve_score(pruner)
        self._targets, self._ignore = self._resolve_targets(pruner)
        if state.data.calib is None or len(state.data.calib) == 0:
            raise ValueError(
                "LearnedPermutationModifier needs calibration data, and the calibration set is "
                "empty. Pass dataset=... and num_calibration_samples > 0 to oneshot()."
            )
        self._names = {module: name for name, module in model.named_modules()}
        sites = find_sites(model, self._m, kinds=tuple(self.sites))
        self._residual = next((s for s in sites if s.kind == "residual"), None)
        self._pending = [s for s in sites if s.kind != "residual"]
        logger.info(
            f"LearnedPermutationModifier: {len(sites)} sites, method={self.method}, "
            f"{self.mask_structure}, score={self._score_kind}"
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        if self._chooses_end_to_end:
            self._pruned = [
                module
                for _, module in match_named_modules(state.model, self._targets, self._ignore)
                if isinstance(module, nn.Linear)
            ]
            self._batches = packed_batches(state.data.calib)
        if self._residual is not None:
            self._learn_residual(state)
        for site in self._pending:
            for module in self._objective_modules(site):
                self.register_hook(module, self._layer_stats.hook, "forward")
        for module in self._pruned:  # input energy of every pruned Linear, for the simulated pruner
            self.register_hook(module, self._energy.hook, "forward")

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        calibrated = set(kwargs.get("modules", ()))
        for site in [s for s in self._pending if any(c.module in calibrated for c in s.consumer_modules)]:
            choose = None
            if self._chooses_end_to_end:
                choose = self._chooser(state.model, site, self._calibrated_energy(), self._batches[:1])
            self._learn_site(state.model, site, self._layer_stats.pop(self._objective_modules(site)), choose)
            self._pending.remove(site)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._energy.pop(list(self._energy.sums))
        self._batches = []
        if self._pending:
            raise RuntimeError(
                "LearnedPermutationModifier: no calibration statistics reached "
                f"{[s.name for s in self._pending]}; the calibration pipeline did not run these "
                "layers. Use the sequential or independent pipeline."
            )

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_calibration_end(state, None)
        self._log_summary()
        write_artifacts_on_save(state.model, self.report(), self._permutations)
        return True

    # ------------------------------------------------------------------ public

    def report(self) -> dict:
        """Per-site objective before/after and time, as written to permutation_report.json."""
        return {
            "modifier": type(self).__name__,
            "mask_structure": self.mask_structure,
            "method": self.method,
            "score": getattr(self, "_score_kind", self.score),
            "objective": "reconstruction error ||X (W - W_pruned)^T||^2 / ||X W^T||^2",
            "total_seconds": round(sum(site["seconds"] for site in self._report), 3),
            "sites": list(self._report),
        }

    @property
    def _chooses_end_to_end(self) -> bool:
        return self.method == "learned" and self.end_to_end

    # ------------------------------------------------------------------ recipe checks

    def _recipe_modifiers(self) -> list:
        return list(active_session().lifecycle.recipe.modifiers or [])

    def _following_pruner(self) -> SparsityModifierBase | None:
        modifiers = self._recipe_modifiers()
        position = next((i for i, m in enumerate(modifiers) if m is self), None)
        pruners = [(i, m) for i, m in enumerate(modifiers) if isinstance(m, SparsityModifierBase)]
        if position is not None:
            earlier = [type(m).__name__ for i, m in pruners if i < position]
            if earlier:
                raise ValueError(
                    f"LearnedPermutationModifier is placed after {earlier[0]} in the recipe. The "
                    "pruner would prune before the permutation exists; move "
                    "LearnedPermutationModifier before it."
                )
        pruner = next((m for i, m in pruners if position is None or i > position), None)
        if pruner is not None and pruner.mask_structure != self.mask_structure:
            raise ValueError(
                f"mask_structure mismatch: LearnedPermutationModifier has "
                f'"{self.mask_structure}" but {type(pruner).__name__} has "{pruner.mask_structure}". '
                "The permutation is learned for one N:M pattern; set both to the same value."
            )
        return pruner

    def _resolve_score(self, pruner) -> str:
        if self.score != "auto":
            return self.score
        if pruner is None:
            return "wanda"
        kind = PRUNER_SCORES.get(type(pruner).__name__)
        if kind is None:
            raise ValueError(
                f"score='auto' cannot infer a score for {type(pruner).__name__}; set score to one "
                f"of {sorted(SCORE_KINDS)}."
            )
        return kind

    def _resolve_targets(self, pruner) -> tuple[list[str], list[str]]:
        targets = self.targets if self.targets is not None else getattr(pruner, "targets", ["Linear"])
        ignore = self.ignore if self.ignore is not None else getattr(pruner, "ignore", ["re:.*lm_head"])
        return ([targets] if isinstance(targets, str) else list(targets)), list(ignore)

    def _objective_modules(self, site: PermutationSite) -> list[nn.Module]:
        """Consumers of the site that the pruner will actually prune."""
        return [
            named.module
            for named in site.consumer_modules
            if match_targets(named.name, named.module, self._targets)
            and not match_targets(named.name, named.module, self._ignore)
        ]

    # ------------------------------------------------------------------ learning

    def _learn_residual(self, state: State):
        """Statistics from one forward pass, then solve; with ``learned``, choose among candidates
        by the calibration loss of the model pruned in simulation."""
        start = time.perf_counter()
        site = self._residual
        readers = self._objective_modules(site)
        observed = list(dict.fromkeys(readers + self._pruned))
        stats = InputStatistics(full=False)
        handles = {self.register_hook(m, stats.hook, "forward") for m in observed}
        device = get_main_device()
        with calibration_forward_context(state.model), HooksMixin.disable_hooks(keep=handles):
            for batch in tqdm(state.data.calib, desc="Residual statistics"):
                state.model(**{k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        self.remove_hooks(handles)
        act_sq = stats.pop(observed)
        choose = None
        if self._chooses_end_to_end:
            choose = self._chooser(state.model, site, {m: act_sq[m] for m in self._pruned if m in act_sq}, self._batches)
        self._learn_site(state.model, site, {m: act_sq[m] for m in readers if m in act_sq}, choose, start)

    def _calibrated_energy(self) -> dict[nn.Linear, torch.Tensor]:
        """Input energy of the pruned Linears calibrated so far: this layer's and the ones before it."""
        return dict(self._energy.sums)

    def _chooser(self, model: nn.Module, site: PermutationSite, act_sq: dict, batches: list):
        """``choose(candidates)`` for ``_learn_site``: the candidate whose simulated pruning of the
        Linears in ``act_sq`` gives the lowest loss on ``batches``."""
        check_finite_statistics(act_sq, self._names)
        simulation = SimulatedPruning(self, act_sq, self._score_kind, self._n, self._m, get_main_device())
        consumers = [named.module for named in site.consumer_modules if named.module in act_sq]

        def choose(candidates: dict[str, torch.Tensor]) -> tuple[str, dict[str, float]]:
            losses = {}
            for label, perm in candidates.items():
                orders = dict.fromkeys(consumers, site.consumer_column_index(perm))
                losses[label] = simulation.loss(model, batches, orders, f"{site.name}: {label}")
            if not all(math.isfinite(loss) for loss in losses.values()):
                raise ValueError(
                    f"{site.name}: the simulated-pruning calibration loss is not finite ({losses}): the model "
                    "produces NaN or inf logits on the calibration data; check its dtype (float32 or "
                    "bfloat16, not float16)."
                )
            chosen = min(losses, key=losses.get)
            logger.info(
                f"{site.name} candidates, simulated-pruning calibration loss: "
                + ", ".join(f"{label} {loss:.4f}" for label, loss in losses.items())
                + f"; kept {chosen}"
            )
            return chosen, losses

        return choose

    def _candidates(self, site: PermutationSite, consumers: list, problem: dict) -> dict[str, torch.Tensor]:
        """Identity, ria, and greedy and learned solves (``restarts`` seeds for the residual site,
        one per-layer); a permutation found twice is kept once, under its first label."""
        candidates = {"identity": torch.arange(site.size), "ria": solve_permutation(consumers, method="ria", **problem)}
        for seed in range(self.seed, self.seed + (self.restarts if site.kind == "residual" else 1)):
            candidates[f"greedy (seed {seed})"] = solve_permutation(consumers, method="greedy", seed=seed, **problem)
            candidates[f"learned (seed {seed})"] = solve_permutation(
                consumers, method="learned", seed=seed, **problem, **self.solver_args
            )
        unique = {}
        for label, perm in candidates.items():
            if not any(torch.equal(perm.cpu(), kept.cpu()) for kept in unique.values()):
                unique[label] = perm
        return unique

    def _learn_site(self, model: nn.Module, site: PermutationSite, stats: dict, choose=None, start=None):
        """Solve, fold and report one site; ``choose`` (method learned) picks among candidates.
        ``start``: when the site's work began, if before this call (the residual's statistics pass)."""
        start = time.perf_counter() if start is None else start
        check_finite_statistics(stats, self._names)
        if not stats:
            logger.warning(f"{site.name}: no targeted consumer saw calibration data; left as is")
            return
        consumers = site.consumers_from_stats(stats)
        problem = dict(n=self._n, m=self._m, score_kind=self._score_kind, block_size=site.block_size)
        selection = {}
        with torch.enable_grad():
            if choose is None:
                perm = solve_permutation(consumers, method=self.method, seed=self.seed, **problem, **self.solver_args)
            else:
                candidates = self._candidates(site, consumers, problem)
                chosen, losses = choose(candidates)
                perm = candidates[chosen]
                selection = {"chosen_candidate": chosen, "candidate_calibration_losses": losses}
        identity = torch.arange(site.size)
        before = reconstruction_error(consumers, identity, **problem)
        after = reconstruction_error(consumers, perm, **problem)
        fold_permutation(model, site, perm)
        columns = site.consumer_column_index(perm)
        for named in site.consumer_modules:
            self._energy.permute_inputs(named.module, columns)
        self._permutations[site.name] = perm.detach().cpu()
        self._reindex_other_modifiers(site, perm)
        seconds = time.perf_counter() - start
        self._report.append(
            {
                "site": site.name,
                "kind": site.kind,
                "channels": site.size,
                "consumers": [self._names[m] for m in stats],
                "objective_before": before,
                "objective_after": after,
                **selection,
                "seconds": round(seconds, 3),
            }
        )
        logger.info(f"{site.name}: objective {before:.4f} -> {after:.4f} ({seconds:.1f}s)")

    def _reindex_other_modifiers(self, site: PermutationSite, perm: torch.Tensor):
        others = [m for m in self._recipe_modifiers() if m is not self]
        if others:
            columns = site.consumer_column_index(perm)
            permuted = {named.module: columns for named in site.consumer_modules}
            touched = reindex_calibration_state(others, permuted, self._names)
            if touched:
                logger.debug(f"{site.name}: re-indexed {touched}")

    def _log_summary(self):
        if not self._report:
            return
        before = sum(site["objective_before"] for site in self._report) / len(self._report)
        after = sum(site["objective_after"] for site in self._report) / len(self._report)
        total = sum(site["seconds"] for site in self._report)
        logger.info(
            f"LearnedPermutationModifier: {len(self._report)} sites, mean objective "
            f"{before:.4f} -> {after:.4f}, {total:.1f}s"
        )

