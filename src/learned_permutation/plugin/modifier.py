"""``LearnedPermutationModifier``: learn channel permutations during one-shot calibration
and fold them into the weights, so the N:M pruner that follows keeps more of what matters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning import SparseGPTModifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
from llmcompressor.utils.dev import get_main_device

from learned_permutation.plugin.artifacts import write_artifacts_on_save
from learned_permutation.plugin.distributed import (
    all_ranks_batches,
    check_pruner_can_sync,
    check_same_permutations,
    sync_statistics_before_compressing,
    world_size,
)
from learned_permutation.plugin.end_to_end import EndToEndArgs
from learned_permutation.plugin.recipe_checks import (
    RecipeCheckError,
    check_calibration_tokens,
    check_finite_weights,
    check_solver_args,
    following_pruner,
    pruned_modules,
    resolve_score,
    shuffles_unseeded,
)
from learned_permutation.plugin.pruner_model import PrunerModel
from learned_permutation.plugin.search import SCORING_TOKENS, PermutationSearch, SearchSettings, parse_candidate
from learned_permutation.plugin.selection import calibration_sample
from learned_permutation.math import SCORE_KINDS, parse_mask_structure
from learned_permutation.structure import SITE_KINDS, PermutationSite, find_sites, mapping_for

__all__ = ["LearnedPermutationModifier"]

# Under select every candidate runs with its solver's own knobs, so the greedy candidate's configuration is
# the greedy method's (three sweeps over 1,024 sampled weight rows). On SmolLM2-135M 2:4 over three
# calibration seeds, select then folded the held-out best of the ria and greedy methods' models on all six
# seed x pruner runs, where one sweep (session 13's default) lost to the greedy method with Wanda and, chosen
# over ria on a seed, to ria with SparseGPT (docs/results.md, "Session 14"), all at the modifier's seed 0; at
# seeds 1 and 2 the default's means with Wanda are far lower (docs/results.md, "Session 16").
# With Wanda a fourth candidate, greedy on Wanda's score squared (``wanda_energy``, math/scores.py: the same masks,
# but the retained sum is the diagonal output error): chosen in 5 of 9 SmolLM2-135M runs, it took the default's mean
# held-out KL from greedy's level to 0.039 below it, and ahead on stories260K and the 2M model too (docs/results.md,
# "Session 23"). SparseGPT's own score is already an output energy (w^2 / [H^-1]_jj): its greedy is that solve.
DEFAULT_CANDIDATES = ("identity", "ria", "greedy")
DEFAULT_CANDIDATES_BY_SCORE = {"wanda": (*DEFAULT_CANDIDATES, "greedy@wanda_energy")}


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
          method: select
        SparseGPTModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
    ```

    Lifecycle:

    - on_initialize
        - check the architecture, recipe order, mask structure, targets, weights and
          calibration data (before any forward pass)
        - discover the permutation sites (residual, per-layer mlp and attn_vo)
    - on_calibration_start (``learned_permutation.plugin.search``), before any pruner
      has seen an activation
        - one pass over ``sample_tokens`` calibration tokens, layer by layer in 512-token
          chunks (as the sequential pipeline runs): as each decoder layer finishes, every
          candidate solver permutes its mlp and attn_vo sites from that layer alone (from its
          Hessians with SparseGPT, its input energies otherwise), and its
          residual readers give sampled weight rows; then every candidate permutes the residual
          site from them
        - with ``select``: each candidate's whole configuration (its permutation at every
          site) is scored by the KL from the dense model of
          the model pruned in simulation as the pipeline would prune it (each layer from
          statistics on the pruned upstream; with ``simulate_sparsegpt_update``, SparseGPT's
          own OBS update too), over ``scoring_tokens`` sample tokens; the lowest is folded at every site
        - with ``objective: model``: from that result, permutations of ``end_to_end.sites``
          trained through the whole pruned model (``learned_permutation.plugin.end_to_end``):
          Sinkhorn-relaxed cost logits, the pruner's N:M mask in the hard order with a
          straight-through gradient, next-token CE + KL to the dense model, Adam on the
          logits only, ``end_to_end.steps`` steps; folded on top only if the hard result
          beats the start on held-out calibration rows
    - under torchrun (``learned_permutation.plugin.distributed``): the sample is drawn from
      every rank's rows, the ranks' permutations are compared after deciding, and with
      ``sync_pruner_statistics`` the pruner's statistics are all-reduced before it compresses
    - on_calibration_end
        - remove hooks
    - on_finalize
        - log a summary; ``model.save_pretrained`` also writes ``permutation_report.json``
          and ``permutations.safetensors`` (see ``learned_permutation.plugin.artifacts``)

    :param mask_structure: ``"N:M"`` pattern the pruner will apply; must equal the
        pruner's. Quote it in YAML (unquoted ``2:4`` parses as the number 124).
    :param method: ``select`` (the best whole configuration of ``candidates``, as above) or one solver
        for every site: ``greedy`` (channel swaps between groups), ``ria`` (RIA's heuristic),
        ``learned`` (Sinkhorn-relaxed learning on the layer-wise objective) or ``identity``
        (no permutation; a control).
    :param sites: which permutation sites to learn: any of ``residual`` (one permutation
        of the hidden dimension for the whole model), ``mlp`` (per-layer intermediate
        channels, consumed by down_proj) and ``attn_vo`` (per-layer, within each attention
        head, consumed by o_proj). Default: all.
    :param score: importance score the objective prunes by: ``auto`` (mirror the pruner
        that follows: SparseGPT -> ``sparsegpt``, Wanda -> ``wanda``; ``wanda`` when no
        pruner follows), or one of ``magnitude``, ``wanda``, ``wanda_energy``, ``ria``, ``sparsegpt``.
    :param targets: Linear modules whose N:M pruning the permutation optimises. Default:
        the targets of the pruner that follows (``["Linear"]`` without one).
    :param ignore: modules excluded from the objective. Default: the pruner's ignore list
        (``["re:.*lm_head"]`` without one: the head is almost never pruned).
    :param solver_args: keyword arguments of the solver (see
        ``learned_permutation.math.solve_permutation``): for a single ``method`` that
        solver's, e.g. ``{steps: 200}``; with ``select`` per candidate, e.g.
        ``{greedy: {sweeps: 5}}``.
    :param candidates: ``select`` only: the solvers whose configurations are compared; ``ria+greedy``
        is ``greedy`` started from ``ria``'s order; ``ria@wanda`` is ``ria`` solved on another
        importance ``score`` than the modifier's (the simulation still prunes as the pruner does).
        Default: ``identity``, ``ria``, ``greedy``, and with Wanda's score ``greedy@wanda_energy`` too
        (greedy keeping the most of ``w^2 ||x||^2``: the output error, where Wanda's score is its root).
    :param sample_tokens: calibration tokens of the modifier's own passes (the pruner
        still calibrates on the whole set).
    :param scoring_tokens: ``select`` only: the sample's leading tokens each configuration is
        scored on (at most ``sample_tokens``; the default, 2,048, is cut to a smaller
        ``sample_tokens``); each costs two passes over them per configuration.
    :param residual_weighting: how the residual readers' rows enter the residual solves: ``none``
        (a uniform random sample, every row's error counted alike) or ``fisher`` (each row weighted by
        the dense model's loss sensitivity to its output, the squared gradient of the cross-entropy on
        the ``scoring_tokens`` rows, and the heaviest rows kept; one extra forward and backward sweep
        over those rows, layer by layer; ``learned_permutation.plugin.sensitivity``).
    :param seed: seed for every random choice of the solvers.
    :param objective: ``layer`` (the default: candidates from layer statistics, one
        configuration chosen on the calibration loss; no training) or ``model``
        (then also train the permutations of ``end_to_end.sites`` through the whole pruned
        model, starting from the ``layer`` result; budget and loss in ``end_to_end``).
    :param sync_pruner_statistics: under torchrun (a process group), make the following
        SparseGPT or Wanda prune from every rank's calibration data, as one process on the
        union would: its statistics are all-reduced, weighted by sample counts, before it
        compresses (``learned_permutation.plugin.distributed``). False: each rank prunes from
        its own slice, as llm-compressor 0.14 does. No effect in a single process.
    :param simulate_sparsegpt_update: ``select`` with SparseGPT following: score each configuration
        after SparseGPT's own weight update (llm-compressor's ``sparsify_weight`` on every simulated
        Linear) instead of its mask alone. Off by default: on SmolLM2-135M it costs 1.4x SparseGPT's
        own ``oneshot`` (README, "How the default decides") for a lower held-out KL and worse perplexity.
    :param end_to_end: ``objective: model`` only: its sites, step and token budget and loss
        weights (``learned_permutation.plugin.end_to_end.EndToEndArgs``), e.g.

    ```yaml
    LearnedPermutationModifier:
      mask_structure: "2:4"
      objective: model
      end_to_end:
        sites: [residual]
        steps: 100            # Adam steps on the cost logits
        train_tokens: 4096    # calibration tokens trained on, in batches of batch_tokens
        batch_tokens: 1024
        held_out_tokens: 1024 # other calibration rows, for the never-worse check
        ce: 1.0               # loss = ce * cross-entropy + kl * KL(dense || pruned)
        kl: 1.0
    ```
    """

    # The modifier runs its own bounded passes over a calibration sample (plugin/search.py) at
    # calibration start; with True, llm-compressor's independent pipeline would also give it a
    # whole sequential calibration pass of its own, about as costly as the pruner's, and unused.
    requires_calibration_data: bool = False

    mask_structure: str = "2:4"
    method: Literal["select", "learned", "greedy", "ria", "identity"] = "select"
    sites: list[Literal["residual", "mlp", "attn_vo"]] = Field(default_factory=lambda: list(SITE_KINDS))
    score: str = "auto"
    targets: str | list[str] | None = None
    ignore: list[str] | None = None
    solver_args: dict[str, Any] = Field(default_factory=dict)
    candidates: list[str] | None = None
    sample_tokens: int = Field(default=8192, ge=64)
    scoring_tokens: int = Field(default=SCORING_TOKENS, ge=64)
    residual_weighting: Literal["none", "fisher"] = "none"
    seed: int = 0
    objective: Literal["layer", "model"] = "layer"
    end_to_end: EndToEndArgs = Field(default_factory=EndToEndArgs)
    sync_pruner_statistics: bool = True
    simulate_sparsegpt_update: bool = False

    _n: int = PrivateAttr()
    _m: int = PrivateAttr()
    _score_kind: str = PrivateAttr()
    _targets: list[str] = PrivateAttr()
    _ignore: list[str] = PrivateAttr()
    _targeted: dict[nn.Module, str] = PrivateAttr(default_factory=dict)
    _names: dict[nn.Module, str] = PrivateAttr(default_factory=dict)
    _sites: list[PermutationSite] = PrivateAttr(default_factory=list)
    _pruner: Any = PrivateAttr(default=None)
    _search: PermutationSearch | None = PrivateAttr(default=None)
    _calibration: Iterable[dict] = PrivateAttr(default=None)
    _unsync_pruner: Callable[[], None] | None = PrivateAttr(default=None)

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

    @field_validator("candidates")
    @classmethod
    def _check_candidates(cls, value):
        if value is None:
            return value
        if not value or len(set(value)) != len(value):
            raise ValueError(f"candidates must name at least one solver, each once; got {value}")
        for name in value:
            parse_candidate(name)
        return value

    @model_validator(mode="after")
    def _check_end_to_end(self):
        if self.objective != "model":
            if "end_to_end" in self.model_fields_set:
                raise ValueError("end_to_end is set but objective is 'layer'; add objective: model to train it")
            return self
        missing = [kind for kind in self.end_to_end.sites if kind not in self.sites]
        if missing:
            raise ValueError(f"end_to_end.sites {missing} are not among the modifier's sites {self.sites}")
        return self

    @model_validator(mode="after")
    def _check_scoring_tokens(self):
        if "scoring_tokens" in self.model_fields_set and self.scoring_tokens > self.sample_tokens:
            raise ValueError(
                f"scoring_tokens={self.scoring_tokens} exceeds sample_tokens={self.sample_tokens}: configurations "
                "are scored on the sample's leading tokens; raise sample_tokens or lower scoring_tokens")
        return self

    def _scoring_tokens(self) -> int:
        """The default never exceeds a smaller ``sample_tokens`` (a set value that does is refused)."""
        return min(self.scoring_tokens, self.sample_tokens)

    @model_validator(mode="after")
    def _check_solver_args(self):
        if self.method != "select":
            check_solver_args(self.method, self.solver_args)
            return self
        for name, args in self.solver_args.items():
            if name not in self._candidate_solvers() or not isinstance(args, dict):
                raise ValueError(
                    f"with method 'select', solver_args maps the candidates' solvers to their arguments, e.g. "
                    f"{{greedy: {{sweeps: 5}}}}; {name!r} is not one of the solvers {self._candidate_solvers()} "
                    f"of the candidates {self._candidates()}."
                )
            check_solver_args(name, args)
        return self

    # ------------------------------------------------------------------ lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        mapping_for(model)  # unsupported architectures fail here, by name
        self._n, self._m = parse_mask_structure(self.mask_structure)
        pruner = self._following_pruner()
        self._score_kind = self._resolve_score(pruner)
        self._targets, self._ignore = self._resolve_targets(pruner)
        self._names = {module: name for name, module in model.named_modules()}
        self._targeted = {module: name for name, module in pruned_modules(model, self._targets, self._ignore).items()}
        sites = find_sites(model, self._m, kinds=tuple(self.sites))
        if not any(self._objective_modules(site) for site in sites):
            raise RecipeCheckError(
                f"LearnedPermutationModifier: no consumer of the permutation sites {list(self.sites)} is pruned "
                f"with targets={self._targets} and ignore={self._ignore} (resolved as SparseGPT/Wanda resolve "
                "them), so there is nothing to permute for. Set targets to the pruned layers or their "
                'containers (e.g. ["Linear"] or ["re:model.layers.\\d*$"]) and check ignore.'
            )
        check_finite_weights(model)
        if shuffles_unseeded(state.data.calib):
            logger.warning(
                "LearnedPermutationModifier: llm-compressor shuffles the calibration samples with an unseeded "
                "sampler (shuffle_calibration_samples=True, its default), so two runs differ; pass "
                "shuffle_calibration_samples=False to oneshot() for a reproducible run."
            )
        # Under torchrun, every rank's rows: the sample is then the one a single process would take.
        self._calibration = all_ranks_batches(state.data.calib)
        tokens = check_calibration_tokens(self._calibration)
        if self.simulate_sparsegpt_update and not isinstance(pruner, SparseGPTModifier):
            raise ValueError(
                "LearnedPermutationModifier: simulate_sparsegpt_update is set but the pruner that follows is "
                f"{type(pruner).__name__ if pruner is not None else 'none'}, not SparseGPTModifier; remove the field "
                "or put SparseGPTModifier after this modifier in the same stage."
            )
        if self._syncs_pruner(pruner):
            check_pruner_can_sync(pruner)
        if self.objective == "model":
            self._warn_if_end_to_end_cannot_see_the_update()
            self._check_end_to_end_budget(sites, tokens)
        self._sites, self._pruner = sites, pruner
        logger.info(
            f"LearnedPermutationModifier: {len(sites)} sites, method={self.method}, "
            f"{self.mask_structure}, score={self._score_kind}, {tokens} calibration tokens"
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._search = PermutationSearch(
            state.model,
            self._sites,
            [module for module in self._targeted if isinstance(module, nn.Linear)],
            self._objective_modules,
            SearchSettings(
                candidates=tuple(self._candidates()) if self.method == "select" else (self.method,),
                pruner=(PrunerModel.following(self._pruner, self._score_kind, self._n, self._m)
                        if self.simulate_sparsegpt_update else PrunerModel(self._score_kind, self._n, self._m)),
                seed=self.seed,
                solver_args=self._candidate_solver_args(),
                scoring_tokens=self._scoring_tokens(),
                residual_weighting=self.residual_weighting,
                end_to_end=self.end_to_end if self.objective == "model" else None,
            ),
            self,
            self._names,
        )
        start = time.perf_counter()
        end_to_end_sample = None
        if self.objective == "model":
            end_to_end_sample = calibration_sample(self._calibration, self.end_to_end.train_tokens + self.end_to_end.held_out_tokens)
        self._search.run(calibration_sample(self._calibration, self.sample_tokens), get_main_device(), end_to_end_sample)
        self._search.phases["total"] = time.perf_counter() - start
        self._calibration = None
        check_same_permutations(self._search.permutations)
        if self._syncs_pruner(self._pruner):
            self._unsync_pruner = sync_statistics_before_compressing(self._pruner)

    def _syncs_pruner(self, pruner) -> bool:
        return self.sync_pruner_statistics and pruner is not None and world_size() > 1

    def _candidate_solver_args(self) -> dict[str, dict]:
        """Knobs per solver: with ``select``, the user's per candidate solver (none: the solver's defaults)."""
        if self.method != "select":
            return {self.method: dict(self.solver_args)}
        return {name: dict(self.solver_args.get(name, {})) for name in self._candidate_solvers()}

    def _candidates(self) -> list[str]:
        """``candidates``, or the default for the resolved score (before ``on_initialize``: the default's solvers,
        which are the same for every score)."""
        if self.candidates is not None:
            return list(self.candidates)
        return list(DEFAULT_CANDIDATES_BY_SCORE.get(getattr(self, "_score_kind", None), DEFAULT_CANDIDATES))

    def _candidate_solvers(self) -> list[str]:
        """The solvers the candidates run, chains (``ria+greedy``) split into their stages."""
        return list(dict.fromkeys(stage for name in self._candidates() for stage in parse_candidate(name)[0]))

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_calibration_end(state, None)
        if self._unsync_pruner is not None:
            self._unsync_pruner()
        self._log_summary()
        write_artifacts_on_save(state.model, self.report(), self._search.permutations if self._search else {})
        return True

    # ------------------------------------------------------------------ public

    def report(self) -> dict:
        """Per-site objective before/after, candidates and time, and the seconds of each phase, as
        written to permutation_report.json."""
        search = self._search
        return {
            "modifier": type(self).__name__,
            "mask_structure": self.mask_structure,
            "method": self.method,
            "candidates": self._candidates() if self.method == "select" else [self.method],
            "score": getattr(self, "_score_kind", self.score),
            "sample_tokens": self.sample_tokens,
            "scoring_tokens": self._scoring_tokens(),
            "residual_weighting": self.residual_weighting,
            "processes": world_size(),
            "pruner_statistics_synced": self._syncs_pruner(self._pruner),
            "objective": "reconstruction error ||X (W - W_pruned)^T||^2 / ||X W^T||^2 (W_pruned: the score's N:M mask)",
            "total_seconds": round(search.phases.get("total", 0.0), 3) if search else 0.0,
            "phase_seconds": {k: round(v, 3) for k, v in search.phases.items() if k != "total"} if search else {},
            **(search.selection if search else {}),
            "sites": list(search.report) if search else [],
            **({"end_to_end": search.end_to_end_report} if search and search.end_to_end_report else {}),
        }

    # ------------------------------------------------------------------ recipe checks

    def _recipe_modifiers(self) -> list:
        return list(active_session().lifecycle.recipe.modifiers or [])

    def _following_pruner(self) -> SparsityModifierBase | None:
        return following_pruner(self._recipe_modifiers(), self)

    def _resolve_score(self, pruner) -> str:
        return resolve_score(self.score, pruner)

    def _resolve_targets(self, pruner) -> tuple[list[str], list[str]]:
        targets = self.targets if self.targets is not None else getattr(pruner, "targets", ["Linear"])
        ignore = self.ignore if self.ignore is not None else getattr(pruner, "ignore", ["re:.*lm_head"])
        return ([targets] if isinstance(targets, str) else list(targets)), list(ignore)

    def _check_end_to_end_budget(self, sites: list[PermutationSite], tokens: int) -> None:
        """Blocks that tile the learned sites in whole N:M groups, and data for the held-out rows."""
        for site in (s for s in sites if s.kind in self.end_to_end.sites):
            block = self.end_to_end.block_for(site)
            if site.size % block or block % self._m:
                raise RecipeCheckError(
                    f"end_to_end.block={block} must be a multiple of M={self._m} that divides the {site.size} "
                    f"channels of site {site.name}; choose another block or leave it unset (the whole site)"
                )
        if tokens < self.end_to_end.held_out_tokens + 64:
            raise RecipeCheckError(
                f"objective: model keeps end_to_end.held_out_tokens={self.end_to_end.held_out_tokens} calibration "
                f"tokens apart for its check and trains on the rest, but the calibration data holds {tokens}; "
                "lower held_out_tokens or pass more calibration data"
            )

    def _warn_if_end_to_end_cannot_see_the_update(self) -> None:
        """The end-to-end stage simulates the pruner as its N:M mask; SparseGPT also re-solves the kept
        weights, so the stage trains for a model SparseGPT never produces (measured in the README)."""
        if self._score_kind == "sparsegpt":
            logger.warning(
                "LearnedPermutationModifier: objective: model trains against SparseGPT's N:M mask without its "
                "weight update, so it can make SparseGPT worse (on SmolLM2-135M, 2:4: held-out C4 perplexity "
                "96.5 against 94.8 with objective: layer; README, 'What objective: model does today'); with "
                "SparseGPT prefer objective: layer."
            )

    def _objective_modules(self, site: PermutationSite) -> list[nn.Module]:
        """Consumers of the site that the pruner will actually prune (``_targeted``, resolved as the pruner does)."""
        return [named.module for named in site.consumer_modules if named.module in self._targeted]

    def _log_summary(self):
        sites = self._search.report if self._search else []
        if not sites:
            return
        before = sum(site["objective_before"] for site in sites) / len(sites)
        after = sum(site["objective_after"] for site in sites) / len(sites)
        logger.info(
            f"LearnedPermutationModifier: {len(sites)} sites, mean objective "
            f"{before:.4f} -> {after:.4f}, {self._search.phases.get('total', 0.0):.1f}s"
        )
