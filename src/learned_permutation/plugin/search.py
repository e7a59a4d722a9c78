"""The modifier's own work: one bounded pass over a calibration sample, then one choice for the whole model.

Everything is decided at calibration start, before any pruner has seen an activation, so nothing a
pruner accumulates ever needs re-indexing, in the independent and the sequential pipeline alike.

1. Layer pass: the decoder over ``calibration_sample`` tokens, layer by layer in row chunks
   (``selection.scored_final_hidden``: a layer's activations are one chunk's), with hooks that gather
   the input energy of every targeted Linear and, when the pruner's score reads it (SparseGPT), the
   Hessian ``X^T X`` of each per-layer site's consumer. When a decoder layer has run, each candidate
   solver permutes its sites from that layer alone (one prepared problem per site and score, shared by the
   solvers and the layer-wise objectives), the Hessians are dropped, and the layer's residual readers contribute
   sampled rows (``plugin/residual_sample.py``). Extra memory: one layer's Hessians, the sample's hidden
   states and one chunk's activations inside a layer.
2. Residual: each candidate solver permutes the residual stream from the sampled rows. With
   ``residual_weighting: fisher`` the rows are weighted by the dense model's loss sensitivity to them,
   from one forward and backward sweep over the ``scoring_tokens`` rows before the layer pass
   (``plugin/sensitivity.py``), and the heaviest are kept.
3. Whole-model choice: a configuration is one permutation per site; each candidate solver's own
   configuration is scored by the KL divergence from the dense model (whose predictions the layer pass
   kept) of the model pruned in simulation (``plugin/selection.py``), on the sample's first
   ``scoring_tokens``, each layer masked from statistics taken on the already pruned layers'
   outputs, as llm-compressor's sequential pipeline calibrates the pruner. The lowest KL is folded. The
   layer-wise objective and the pruner's per-Linear output error (even after SparseGPT's own update)
   both rank permutations close to chance on held-out text, while this calibration KL ranks whole
   configurations as held-out KL does (``results/ablations/``); and mixing sites from different solvers
   did worse than either solver's own configuration on SmolLM2-135M (``docs/results.md``), so no mixed
   configuration is scored.

So the cost is one forward over the sample, two over ``scoring_tokens`` of it per configuration
(a calibration and a pruned pass of each layer), and the solves, whatever the depth.

4. Optionally (``objective: model``), from that result, permutations trained through the whole pruned
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

from learned_permutation.math import SCORE_KINDS, SiteProblem, solve_site
from learned_permutation.math.solvers import SOLVERS
from learned_permutation.plugin.end_to_end import EndToEndArgs, EndToEndLearning, split_sample
from learned_permutation.plugin.pruner_model import PrunerModel
from learned_permutation.plugin.residual_sample import ReaderRowSample
from learned_permutation.plugin.selection import SimulatedPruning, leading_rows, scored_final_hidden
from learned_permutation.plugin.sensitivity import output_row_fisher
from learned_permutation.plugin.statistics import InputStatistics, check_finite_statistics
from learned_permutation.structure import PermutationSite, fold_permutations
from learned_permutation.structure.offload import read_parameter

__all__ = ["SearchSettings", "PermutationSearch", "SCORING_TOKENS", "parse_candidate"]

SCORING_TOKENS = 2048  # the modifier's ``scoring_tokens`` default


def parse_candidate(name: str) -> tuple[list[str], str | None]:
    """A candidate's solver stages and importance score: ``ria+greedy@wanda`` is ``greedy`` started from
    ``ria``'s order, both on the Wanda score (without ``@``: the modifier's score)."""
    chain, at, score = name.partition("@")
    stages = chain.split("+")
    if any(stage not in SOLVERS for stage in stages) or (at and score not in SCORE_KINDS):
        raise ValueError(
            f"candidate {name!r} is not solver[+solver...][@score] with solvers from {list(SOLVERS)} and scores "
            f"from {list(SCORE_KINDS)}, e.g. 'greedy', 'ria+greedy' or 'ria@wanda'")
    return stages, score or None


@dataclass(frozen=True)
class SearchSettings:
    """What the modifier asks for: ``candidates`` (solver names) are compared per site when there is
    more than one; ``solver_args`` maps a solver name to its knobs; ``scoring_tokens``: the sample's leading
    tokens the configurations are scored on; ``residual_weighting``: ``fisher`` weights the residual readers'
    rows by their loss sensitivity (``plugin/sensitivity.py``), ``none`` samples them uniformly;
    ``end_to_end``: the budget of the end-to-end learning that follows (None: none)."""

    candidates: tuple[str, ...]
    pruner: PrunerModel
    seed: int = 0
    solver_args: dict[str, dict] = field(default_factory=dict)
    scoring_tokens: int = SCORING_TOKENS
    residual_weighting: str = "none"
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
        self.candidates: dict[PermutationSite, SiteCandidates] = {}
        self.selection: dict = {}
        self.permutations: dict[str, torch.Tensor] = {}
        self.phases: dict[str, float] = {}
        self.end_to_end_report: dict | None = None

    # ------------------------------------------------------------------ entry point

    def run(self, sample: dict, device: torch.device | str, end_to_end_sample: dict | None = None) -> None:
        """``end_to_end_sample``: the calibration rows of the end-to-end learning (with ``end_to_end``)."""
        scoring, scored = leading_rows(sample, self.settings.scoring_tokens)  # what the configuration passes score
        layer_readers = self._layer_readers()  # found once: the sweep and the layer pass both go layer by layer
        sensitivity = self._residual_sensitivity(scoring, device, layer_readers)
        start = time.perf_counter()
        energy, readers, dense = self._layer_pass(sample, device, scored, layer_readers, sensitivity)
        self.phases["layer pass (statistics, per-layer candidates)"] = time.perf_counter() - start
        if self.residual is not None:
            self._solve_residual(energy, readers)
        self._choose_configuration(scoring, device, energy, dense)
        if self.settings.end_to_end is not None:
            self._learn_end_to_end(end_to_end_sample, device, energy)

    # ------------------------------------------------------------------ layer pass

    def _residual_sensitivity(self, scoring: dict, device, layer_readers: list[list[nn.Module]]) -> dict[nn.Module, torch.Tensor]:
        """With ``residual_weighting: fisher``, each residual reader's per-row loss sensitivity on the
        scored rows (one forward and one backward sweep over them, layer by layer); else nothing."""
        if self.residual is None or self.settings.residual_weighting != "fisher":
            return {}
        start = time.perf_counter()
        with HooksMixin.disable_hooks():
            fisher = output_row_fisher(self.model, scoring, layer_readers, device)
        self.phases["residual sensitivity"] = time.perf_counter() - start
        return fisher

    def _layer_readers(self) -> list[list[nn.Module]]:
        """The targeted residual readers inside each decoder layer (none without a residual site)."""
        readers = [] if self.residual is None else self.targeted(self.residual)
        return [[m for m in readers if _is_inside(m, layer)] for layer in self.model.get_decoder().layers]

    def _layer_pass(self, sample: dict, device, scored: int, layer_readers: list[list[nn.Module]],
                    sensitivity: dict[nn.Module, torch.Tensor]) -> tuple[InputStatistics, ReaderRowSample, torch.Tensor]:
        """Statistics, per-layer candidates, residual row sample (``layer_readers[i]``: decoder layer ``i``'s
        residual readers), and the dense model's final hidden states at the ``scored`` positions the
        configuration passes score (nothing is folded before the whole pass has run); residual rows weighted
        by ``sensitivity`` where given."""
        energy = InputStatistics(full=False)
        hessians = InputStatistics(full=True) if self.settings.pruner.needs_hessian else None
        layers = self.model.get_decoder().layers
        residual_readers = [] if self.residual is None else self.targeted(self.residual)
        total_rows = sum(module.out_features for module in residual_readers)
        readers = ReaderRowSample(len(layers), total_rows, self.settings.seed, device)  # solved where the layers run
        observed = list(dict.fromkeys(self.pruned + residual_readers))
        handles = {self.hooks.register_hook(m, energy.hook, "forward") for m in observed}
        if hessians is not None:
            for site in self.layer_sites:
                handles |= {self.hooks.register_hook(m, hessians.hook, "forward") for m in self.targeted(site)}

        def finish(index: int) -> None:
            self._finish_layer(index, hessians, energy, readers, layer_readers[index], sensitivity)

        try:
            with HooksMixin.disable_hooks(keep=handles):
                dense = scored_final_hidden(self.model, sample, device, after_layer=finish, leading_positions=scored)
        finally:
            self.hooks.remove_hooks(handles)
        missing = [s.name for s in self.layer_sites if s not in self.candidates and self.targeted(s)]
        if missing:
            raise RuntimeError(f"LearnedPermutationModifier: the calibration pass never reached {missing}")
        return energy, readers, dense

    def _finish_layer(self, index, hessians: InputStatistics | None, energy, readers, layer_readers, sensitivity) -> None:
        """Solve the layer's sites from its Hessians (dropped afterwards), or from the input energies
        when the pruner's score needs no Hessian; then sample the layer's residual readers."""
        for site in [s for s in self.layer_sites if s.layer_index == index]:
            consumers = self.targeted(site)
            stats = hessians.pop(consumers) if hessians is not None else energy.subset(consumers)
            if stats:
                self._solve_layer_site(site, stats)
        for module in layer_readers:
            if module in energy.sums:
                readers.add(read_parameter(module, "weight"), energy.sums[module], sensitivity.get(module))

    def _solve_layer_site(self, site: PermutationSite, stats: dict) -> None:
        start = time.perf_counter()
        check_finite_statistics(stats, self.names)
        solved, problem = self._solve(site, site.consumers_from_stats(stats))
        self.candidates[site] = SiteCandidates(
            solved, self._objectives(site, problem, solved), [self.names[m] for m in stats], time.perf_counter() - start)

    # ------------------------------------------------------------------ residual

    def _solve_residual(self, energy: InputStatistics, readers: ReaderRowSample) -> None:
        start = time.perf_counter()
        site = self.residual
        if not readers.consumers:
            raise ValueError(
                "LearnedPermutationModifier: no Linear that reads the residual stream is targeted by the "
                "pruner; remove 'residual' from sites or target those Linears."
            )
        check_finite_statistics(dict(energy.sums), self.names)
        solved, problem = self._solve(site, readers.consumers)
        names = [self.names[n.module] for n in site.consumer_modules if n.module in energy.sums]
        self.candidates[site] = SiteCandidates(
            solved, self._objectives(site, problem, solved), names, time.perf_counter() - start,
            {"sampled_rows": readers.sampled_rows})
        self.phases["residual solves"] = time.perf_counter() - start

    # ------------------------------------------------------------------ whole-model choice

    def _choose_configuration(self, scoring: dict, device, energy: InputStatistics, dense) -> None:
        """Fold the configuration (each candidate solver's permutation at every site) whose simulated
        pruning diverges least from the dense model on the sample's first ``scoring_tokens``.
        One pass (each layer calibrated, then pruned) per distinct configuration, whatever the depth."""
        start = time.perf_counter()
        configurations = _distinct_configurations(
            {label: {site: found.perms[label] for site, found in self.candidates.items()}
             for label in self.settings.candidates})
        losses: dict[str, dict[str, float]] = {}
        if len(configurations) > 1:
            simulated = [m for m in self.pruned if m in energy.sums]
            simulation = SimulatedPruning(simulated, self.settings.pruner, device)

            def score(configuration: dict) -> dict[str, float]:
                orders = {named.module: site.consumer_column_index(perm)
                          for site, perm in configuration.items() for named in site.consumer_modules
                          if named.module in simulated}
                return simulation.losses(self.model, scoring, dense, orders)

            losses = {label: score(configuration) for label, configuration in configurations.items()}
            _check_finite(losses)
            self.selection = {"configuration_calibration_losses": losses, "chosen_configuration": _lowest_kl(losses),
                              "scored_tokens": int(scoring["attention_mask"].sum())}
            self.phases["configuration passes"] = time.perf_counter() - start
        chosen = configurations[_lowest_kl(losses)] if losses else next(iter(configurations.values()))
        start = time.perf_counter()
        decided = {site: chosen[site] for site in [self.residual, *self.layer_sites] if site in self.candidates}
        fold_permutations(self.model, decided)  # each weight read and written once: seconds on a GPU
        for site, perm in decided.items():
            self._record(site, perm, energy)
        self.phases["folding"] = time.perf_counter() - start

    # ------------------------------------------------------------------ end to end

    def _learn_end_to_end(self, sample: dict, device, energy: InputStatistics) -> None:
        """Train further permutations of the chosen sites through the pruned model; fold them on top."""
        start, args = time.perf_counter(), self.settings.end_to_end
        sites = [s for s in [self.residual, *self.layer_sites] if s is not None and s.kind in args.sites and self.targeted(s)]
        train, held_out = split_sample(sample, args.held_out_tokens, args.batch_tokens)
        act_sq = {module: energy.sums[module] for module in self.pruned if module in energy.sums}
        learning = EndToEndLearning(self.model, sites, self.pruned, act_sq, self.settings.pruner, args, device)
        learned, self.end_to_end_report = learning.run(train, held_out)
        fold_permutations(self.model, {site: learned[site.name] for site in sites})
        for site in sites:
            for named in site.consumer_modules:
                energy.permute_inputs(named.module, site.consumer_column_index(learned[site.name]))
            self.permutations[site.name] = self.permutations[site.name][learned[site.name]]
        self.phases["end-to-end learning"] = time.perf_counter() - start

    # ------------------------------------------------------------------ shared

    def _solve(self, site: PermutationSite, consumers: list) -> tuple[dict[str, torch.Tensor], SiteProblem]:
        """Each candidate's permutation, and the site's problem on the pruner's score (which the layer-wise
        objectives read). A candidate is a solver from the stored order or a chain ``a+b`` (``b`` started from
        ``a``'s result), on the pruner's score or its own (``@score``); each score's problem is prepared once
        for its candidates (scores, SparseGPT's inverse Hessians), one at a time, the pruner's last; a chain's
        first stages are solved once for every candidate that shares them."""
        pruner, candidates = self.settings.pruner, self.settings.candidates
        other_scores: dict[str, list[str]] = {}
        for name in candidates:
            score = parse_candidate(name)[1]
            if score not in (None, pruner.score):
                other_scores.setdefault(score, []).append(name)
        solved: dict[str, torch.Tensor] = {}
        for kind, names in other_scores.items():  # each problem dropped once its candidates are solved
            solved |= self._solve_chains(site, SiteProblem(consumers, pruner.n, pruner.m, kind), names)
        problem = SiteProblem(consumers, pruner.n, pruner.m, pruner.score)
        solved |= self._solve_chains(site, problem, [name for name in candidates if name not in solved])
        return {name: solved[name] for name in candidates}, problem

    def _solve_chains(self, site: PermutationSite, problem: SiteProblem, names: list[str]) -> dict[str, torch.Tensor]:
        """The permutations of the candidates ``names`` that solve on ``problem``'s score."""
        chains: dict[str, torch.Tensor] = {}
        with torch.enable_grad():  # the learned solver trains its logits
            for name in names:
                done = ""
                for stage in parse_candidate(name)[0]:
                    start, done = chains.get(done), f"{done}+{stage}" if done else stage
                    if done not in chains:
                        knobs = {"seed": self.settings.seed, **self.settings.solver_args.get(stage, {})}
                        if start is not None:
                            knobs["init"] = start
                        chains[done] = solve_site(problem, stage, block_size=site.block_size, **knobs)
                chains[name] = chains[done]
        return {name: chains[name].cpu() for name in names}

    def _objectives(self, site, problem: SiteProblem, solved: dict[str, torch.Tensor]) -> dict[str, float]:
        """The layer-wise objective of the stored order (``identity``) and of every candidate."""
        return _per_distinct({"identity": torch.arange(site.size), **solved},
                             lambda perms: [problem.reconstruction_error(perm.to(problem.device)) for perm in perms])

    def _record(self, site: PermutationSite, perm: torch.Tensor, energy: InputStatistics) -> None:
        """Re-index the consumers' input energies to the folded ``perm`` and report the site."""
        found = self.candidates[site]
        columns = site.consumer_column_index(perm)
        for named in site.consumer_modules:
            energy.permute_inputs(named.module, columns)
        self.permutations[site.name] = perm
        label = next(label for label, candidate in found.perms.items() if torch.equal(candidate, perm))
        several = len(found.perms) > 1
        self.report.append({
            "site": site.name, "kind": site.kind, "channels": site.size, "consumers": found.consumers,
            "objective_before": found.objectives["identity"], "objective_after": found.objectives[label],
            **({"candidate_objectives": found.objectives, "chosen_candidate": label} if several else {}),
            **found.extra, "seconds": round(found.seconds, 3),
        })
        logger.info(f"{site.name}: objective {found.objectives['identity']:.4f} -> {found.objectives[label]:.4f}"
                    + (f", kept {label}" if several else "") + f" ({found.seconds:.1f}s)")


@dataclass
class SiteCandidates:
    """One site's candidate permutations (by solver), their layer-wise objectives (``identity``: the
    stored order), the consumers' names, the seconds spent, and extra report fields."""

    perms: dict[str, torch.Tensor]
    objectives: dict[str, float]
    consumers: list[str]
    seconds: float
    extra: dict = field(default_factory=dict)


def _distinct(solved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``solved`` with a permutation found twice kept once, under its first name (no work is done twice)."""
    unique: dict[str, torch.Tensor] = {}
    for name, perm in solved.items():
        if not any(torch.equal(perm, kept) for kept in unique.values()):
            unique[name] = perm
    return unique


def _per_distinct(perms: dict[str, torch.Tensor], measure: Callable[[list[torch.Tensor]], list[float]]) -> dict[str, float]:
    """``measure`` of every labelled permutation, computed once per distinct permutation."""
    unique = _distinct(perms)
    values = dict(zip(unique, measure(list(unique.values()))))
    return {label: next(values[first] for first, kept in unique.items() if torch.equal(kept, perm))
            for label, perm in perms.items()}


def _same_configuration(first: dict, second: dict) -> bool:
    return all(torch.equal(first[site], second[site]) for site in first)


def _distinct_configurations(configurations: dict[str, dict]) -> dict[str, dict]:
    """Configurations with one found twice (every site's permutation equal) kept once, under its first name."""
    unique: dict[str, dict] = {}
    for label, configuration in configurations.items():
        if not any(_same_configuration(configuration, kept) for kept in unique.values()):
            unique[label] = configuration
    return unique


def _lowest_kl(losses: dict[str, dict[str, float]]) -> str:
    return min(losses, key=lambda label: losses[label]["kl"])


def _check_finite(losses: dict[str, dict[str, float]]) -> None:
    if not all(math.isfinite(value) for loss in losses.values() for value in loss.values()):
        raise ValueError(
            f"the simulated-pruning calibration loss is not finite ({losses}): the model produces NaN or inf "
            "logits on the calibration data; check its dtype (float32 or bfloat16, not float16)."
        )


def _is_inside(module: nn.Module, container: nn.Module) -> bool:
    return any(module is inner for inner in container.modules())
