"""The modifier's own work: one bounded pass over a calibration sample, then the residual choice.

Everything is decided at calibration start, before any pruner has seen an activation, so nothing a
pruner accumulates ever needs re-indexing, in the independent and the sequential pipeline alike.

1. Layer pass: one forward of the decoder over ``calibration_sample`` tokens (one batch), with hooks
   that gather the input energy of every targeted Linear and the Hessian ``X^T X`` of each per-layer
   site's consumer. When a decoder layer has run, its sites are decided from that layer alone
   (candidates ranked by the pruner's own output error, ``plugin/pruner_aware.py``) and folded, its
   Hessians dropped, and its residual readers contribute sampled rows (``plugin/residual_sample.py``).
   Extra memory: one layer's Hessians and the captured sample's activations.
2. Residual: candidates solved on the sampled rows, ranked by the KL divergence from the dense model
   (whose predictions the layer pass kept) of the model pruned in simulation, on the sample's first
   ``RESIDUAL_SCORING_TOKENS`` (``plugin/selection.py``): one forward per candidate. The KL compares
   whole predicted distributions of the same tokens, far less noisy than the cross-entropy of the
   sampled next tokens, so half of the default sample is scored, at half the cost.

So the cost is one forward over the sample, one over half of it per residual candidate, and the solves,
whatever the depth.

3. Optionally (``objective: model``), from that result, permutations trained through the whole pruned
   model on its calibration loss (``plugin/end_to_end.py``), folded on top when they beat it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch import nn

from llmcompressor.modifiers.utils.hooks import HooksMixin

from learned_permutation.math import reconstruction_error, solve_permutation
from learned_permutation.plugin.end_to_end import EndToEndArgs, EndToEndLearning, split_sample
from learned_permutation.plugin.pruner_aware import PrunerModel, pruned_output_errors
from learned_permutation.plugin.residual_sample import ReaderRowSample
from learned_permutation.plugin.selection import SimulatedPruning, final_hidden, leading_rows, scored_positions
from learned_permutation.plugin.statistics import InputStatistics, check_finite_statistics
from learned_permutation.structure import PermutationSite, fold_permutation
from learned_permutation.structure.offload import read_parameter

__all__ = ["SearchSettings", "PermutationSearch", "RESIDUAL_SCORING_TOKENS"]

RESIDUAL_SCORING_TOKENS = 4096


@dataclass(frozen=True)
class SearchSettings:
    """What the modifier asks for: ``candidates`` (solver names) are compared per site when there is
    more than one; ``solver_args`` maps a solver name to its knobs; ``end_to_end``: the budget of the
    end-to-end learning that follows (None: none)."""

    candidates: tuple[str, ...]
    pruner: PrunerModel
    seed: int = 0
    solver_args: dict[str, dict] = field(default_factory=dict)
    end_to_end: EndToEndArgs | None = None


class PermutationSearch:
    """Decides, folds and reports every site of ``model``; ``targeted(site)`` lists the consumers the
    pruner will prune, ``pruned`` every Linear it prunes, ``hooks`` owns the forward hooks."""

    def __init__(
        self,
        model: nn.Module,
        sites: list[PermutationSite],
        pruned: list[nn.Linear],
        targeted: Callable[[PermutationSite], list[nn.Module]],
        settings: SearchSettings,
        hooks: HooksMixin,
        names: dict[nn.Module, str],
    ):
        self.model, self.pruned, self.targeted, self.settings = model, pruned, targeted, settings
        self.hooks, self.names = hooks, names
        self.residual = next((s for s in sites if s.kind == "residual"), None)
        self.layer_sites = [s for s in sites if s.kind != "residual"]
        self.report: list[dict] = []
        self.permutations: dict[str, torch.Tensor] = {}
        self.phases: dict[str, float] = {}
        self.end_to_end_report: dict | None = None

    # ------------------------------------------------------------------ entry point

    def run(self, sample: dict, device: torch.device | str, end_to_end_sample: dict | None = None) -> None:
        """``end_to_end_sample``: the calibration rows of the end-to-end learning (with ``end_to_end``)."""
        start = time.perf_counter()
        energy, readers, dense = self._layer_pass(sample, device)
        self.phases["layer pass (statistics, per-layer sites)"] = time.perf_counter() - start
        if self.residual is not None:
            self._decide_residual(sample, device, energy, readers, dense)
        if self.settings.end_to_end is not None:
            self._learn_end_to_end(end_to_end_sample, device, energy)

    # ------------------------------------------------------------------ layer pass

    def _layer_pass(self, sample: dict, device) -> tuple[InputStatistics, ReaderRowSample, torch.Tensor]:
        """Statistics, per-layer decisions, residual row sample, and the dense model's final hidden
        states at the sample's scored positions (folds never change what the model computes)."""
        energy = InputStatistics(full=False)
        hessians = InputStatistics(full=True)
        layers = self.model.get_decoder().layers
        readers = ReaderRowSample(len(layers), self.settings.seed)
        residual_readers = [] if self.residual is None else self.targeted(self.residual)
        observed = list(dict.fromkeys(self.pruned + residual_readers))
        handles = {self.hooks.register_hook(m, energy.hook, "forward") for m in observed}
        for site in self.layer_sites:
            handles |= {self.hooks.register_hook(m, hessians.hook, "forward") for m in self.targeted(site)}
        for index, layer in enumerate(layers):
            layer_readers = [m for m in residual_readers if _is_inside(m, layer)]

            def finish(_module, _args, _output, index=index, layer_readers=layer_readers):
                self._finish_layer(index, hessians, energy, readers, layer_readers)

            handles.add(self.hooks.register_hook(layer, finish, "forward"))
        try:
            with HooksMixin.disable_hooks(keep=handles):
                dense = scored_positions(final_hidden(self.model, sample, device), sample)
        finally:
            self.hooks.remove_hooks(handles)
        missing = [s.name for s in self.layer_sites if s.name not in self.permutations and self.targeted(s)]
        if missing:
            raise RuntimeError(f"LearnedPermutationModifier: the calibration pass never reached {missing}")
        return energy, readers, dense

    def _finish_layer(self, index, hessians, energy, readers, layer_readers) -> None:
        for site in [s for s in self.layer_sites if s.layer_index == index]:
            stats = hessians.pop(self.targeted(site))
            if stats:
                self._decide_layer_site(site, stats, energy)
        for module in layer_readers:
            if module in energy.sums:
                readers.add(read_parameter(module, "weight"), energy.sums[module])

    def _decide_layer_site(self, site: PermutationSite, stats: dict, energy: InputStatistics) -> None:
        start = time.perf_counter()
        check_finite_statistics(stats, self.names)
        consumers = site.consumers_from_stats(stats)
        candidates = _distinct(self._solve(site, consumers))
        errors = {}
        if len(candidates) > 1:
            orders = [site.consumer_column_index(perm) for perm in candidates.values()]
            totals = [0.0] * len(orders)
            for module, hessian in stats.items():
                found = pruned_output_errors(read_parameter(module, "weight"), hessian, orders, self.settings.pruner)
                totals = [total + error for total, error in zip(totals, found)]
            errors = dict(zip(candidates, totals))
        chosen = min(errors, key=errors.get) if errors else next(iter(candidates))
        selection = {"candidate_pruned_errors": errors, "chosen_candidate": chosen} if errors else {}
        self._fold(site, candidates[chosen], consumers, energy, selection, stats, start)

    # ------------------------------------------------------------------ residual

    def _decide_residual(self, sample, device, energy: InputStatistics, readers: ReaderRowSample, dense) -> None:
        start = time.perf_counter()
        site = self.residual
        if not readers.consumers:
            raise ValueError(
                "LearnedPermutationModifier: no Linear that reads the residual stream is targeted by the "
                "pruner; remove 'residual' from sites or target those Linears."
            )
        check_finite_statistics(dict(energy.sums), self.names)
        candidates = _distinct(self._solve(site, readers.consumers))
        self.phases["residual solves"] = time.perf_counter() - start
        losses = {}
        if len(candidates) > 1:
            select_start = time.perf_counter()
            act_sq = {m: energy.sums[m] for m in self.pruned if m in energy.sums}
            simulation = SimulatedPruning(self.hooks, act_sq, self.settings.pruner.score,
                                          self.settings.pruner.n, self.settings.pruner.m, device)
            readers_here = [named.module for named in site.consumer_modules if named.module in act_sq]
            scoring, scored = leading_rows(sample, RESIDUAL_SCORING_TOKENS)
            for label, perm in candidates.items():
                orders = dict.fromkeys(readers_here, site.consumer_column_index(perm))
                losses[label] = simulation.losses(self.model, scoring, dense[:scored], orders)
            if not all(math.isfinite(value) for loss in losses.values() for value in loss.values()):
                raise ValueError(
                    f"residual: the simulated-pruning calibration loss is not finite ({losses}): the model "
                    "produces NaN or inf logits on the calibration data; check its dtype (float32 or "
                    "bfloat16, not float16)."
                )
            self.phases["residual selection passes"] = time.perf_counter() - select_start
        chosen = min(losses, key=lambda label: losses[label]["kl"]) if losses else next(iter(candidates))
        selection = {"candidate_calibration_losses": losses, "chosen_candidate": chosen,
                     "scored_tokens": int(scoring["attention_mask"].sum())} if losses else {}
        self._fold(site, candidates[chosen], readers.consumers, energy, selection, None, start,
                   sampled_rows=readers.sampled_rows)

    # ------------------------------------------------------------------ end to end

    def _learn_end_to_end(self, sample: dict, device, energy: InputStatistics) -> None:
        """Train further permutations of the chosen sites through the pruned model; fold them on top."""
        start, args = time.perf_counter(), self.settings.end_to_end
        sites = [s for s in [self.residual, *self.layer_sites] if s is not None and s.kind in args.sites and self.targeted(s)]
        train, held_out = split_sample(sample, args.held_out_tokens, args.batch_tokens)
        act_sq = {module: energy.sums[module] for module in self.pruned if module in energy.sums}
        learning = EndToEndLearning(self.model, sites, self.pruned, act_sq, self.settings.pruner, args, device)
        learned, self.end_to_end_report = learning.run(train, held_out)
        for site in sites:
            fold_permutation(self.model, site, learned[site.name])
            for named in site.consumer_modules:
                energy.permute_inputs(named.module, site.consumer_column_index(learned[site.name]))
            self.permutations[site.name] = self.permutations[site.name][learned[site.name]]
        self.phases["end-to-end learning"] = time.perf_counter() - start

    # ------------------------------------------------------------------ shared

    def _solve(self, site: PermutationSite, consumers: list) -> dict[str, torch.Tensor]:
        """Each candidate solver's permutation.

        Among several candidates, ``greedy`` swaps start from ``ria``'s order when both are asked for
        (and no ``init`` is given): far fewer swaps are left to find, which is what keeps the per-layer
        work small (``benchmarks/scale.py``)."""
        problem = dict(n=self.settings.pruner.n, m=self.settings.pruner.m, score_kind=self.settings.pruner.score,
                       block_size=site.block_size)
        solved: dict[str, torch.Tensor] = {}
        with torch.enable_grad():  # the learned solver trains its logits
            for name in self.settings.candidates:
                knobs = {"seed": self.settings.seed, **self.settings.solver_args.get(name, {})}
                if name == "greedy" and "ria" in solved and "init" not in knobs:
                    knobs["init"] = solved["ria"]
                perm = solve_permutation(consumers, method=name, **problem, **knobs).cpu()
                solved[name] = perm
        return solved

    def _fold(self, site, perm, consumers, energy, selection, stats, start, **extra) -> None:
        problem = dict(n=self.settings.pruner.n, m=self.settings.pruner.m, score_kind=self.settings.pruner.score)
        before = reconstruction_error(consumers, torch.arange(site.size), **problem)
        after = reconstruction_error(consumers, perm, **problem)
        fold_permutation(self.model, site, perm)
        columns = site.consumer_column_index(perm)
        for named in site.consumer_modules:
            energy.permute_inputs(named.module, columns)
        self.permutations[site.name] = perm
        names = [self.names[m] for m in stats] if stats is not None else [self.names[n.module] for n in site.consumer_modules if n.module in energy.sums]
        seconds = time.perf_counter() - start
        self.report.append({
            "site": site.name, "kind": site.kind, "channels": site.size, "consumers": names,
            "objective_before": before, "objective_after": after, **selection, **extra,
            "seconds": round(seconds, 3),
        })
        logger.info(f"{site.name}: objective {before:.4f} -> {after:.4f}" + (
            f", kept {selection['chosen_candidate']}" if selection else "") + f" ({seconds:.1f}s)")


def _distinct(solved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``solved`` with a permutation found twice kept once, under its first name (no pass is spent twice)."""
    unique: dict[str, torch.Tensor] = {}
    for name, perm in solved.items():
        if not any(torch.equal(perm, kept) for kept in unique.values()):
            unique[name] = perm
    return unique


def _is_inside(module: nn.Module, container: nn.Module) -> bool:
    return any(module is inner for inner in container.modules())
