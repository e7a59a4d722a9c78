"""``objective: model``: permutations trained through the whole pruned model on its own loss.

Starts from what the layer-wise search folded (so the start is the identity of the folded model's
channels) and learns, per site in ``EndToEndArgs.sites``, cost logits for a further permutation:

* every step, log-domain Sinkhorn at an annealed temperature gives a soft permutation and Hungarian
  the hard one; every targeted Linear computes with the pruner's N:M score mask taken in the hard
  order (exact forward), and the gradient reaches the soft permutation straight through
  (``learned_permutation.math.straight_through``);
* loss = ``ce`` x next-token cross-entropy + ``kl`` x KL(dense || pruned) of the next-token
  distributions + ``hidden`` x the mean over decoder layers of the relative squared error of the
  layer's output against the dense model's, on calibration tokens; the dense targets are computed
  once, before training, with no mask (the folded model computes what the dense one did);
* all weights frozen, Adam on the logits only, each decoder layer under gradient checkpointing;
* at ``checks`` points the hard permutation is scored on held-out calibration rows (never trained
  on) with the same loss; the lowest of those and of the start is folded, so the result is never
  worse than the start there.

``search: random`` spends the same loop on random search instead of the gradient: each step shuffles
a few channels of the best order so far and keeps the result if its loss on that step's batch is
lower (the equal-compute control of ``benchmarks/end_to_end_ablation.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from compressed_tensors.utils import patch_attr
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.helpers import disable_cache, eval_context

from learned_permutation.math import nm_mask
from learned_permutation.math.objectives import mask_in_original_order
from learned_permutation.math import score as pruning_score
from learned_permutation.math.straight_through import (
    annealed_temperature,
    block_logits,
    hard_columns,
    pruned_in_order,
    soft_permutation,
)
from learned_permutation.plugin.pruner_model import PrunerModel
from learned_permutation.plugin.selection import head_losses, instance_forward, predicting_positions
from learned_permutation.structure import PermutationSite

__all__ = ["EndToEndArgs", "EndToEndLearning", "split_sample"]


class EndToEndArgs(BaseModel):
    """Budget and loss of ``objective: model``. Cost: ``steps`` x (forward + recomputed forward +
    backward) over ``batch_tokens`` tokens, plus ``checks`` x forward over ``held_out_tokens``."""

    model_config = ConfigDict(extra="forbid")

    sites: list[Literal["residual", "mlp", "attn_vo"]] = Field(default_factory=lambda: ["residual"])
    steps: int = Field(default=100, ge=1)
    train_tokens: int = Field(default=4096, ge=64)
    batch_tokens: int = Field(default=1024, ge=64)
    held_out_tokens: int = Field(default=1024, ge=64)
    checks: int = Field(default=4, ge=1)
    lr: float = Field(default=0.05, gt=0)
    temperature: list[float] = Field(default_factory=lambda: [1.0, 0.05])  # a list: recipe.yaml cannot hold a tuple
    sinkhorn_iters: int = Field(default=10, ge=1)
    init_scale: float = Field(default=1.0, gt=0)
    block: int | None = Field(default=None, ge=2)
    ce: float = Field(default=1.0, ge=0)
    kl: float = Field(default=1.0, ge=0)
    hidden: float = Field(default=0.0, ge=0)
    search: Literal["gradient", "random"] = "gradient"
    shuffle_fraction: float = Field(default=0.05, gt=0, le=1)

    @field_validator("sites")
    @classmethod
    def _check_sites(cls, value):
        if not value or len(set(value)) != len(value):
            raise ValueError(f"end_to_end.sites must name at least one site kind, each once; got {value}")
        return value

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value):
        start, end = value
        if not 0 < end <= start:
            raise ValueError(f"end_to_end.temperature is (start, end) with start >= end > 0; got {value}")
        return value

    @model_validator(mode="after")
    def _check_budget(self):
        if self.ce + self.kl + self.hidden == 0:
            raise ValueError("end_to_end: the loss weights ce, kl and hidden are all 0; give one a weight")
        if self.batch_tokens > self.train_tokens:
            raise ValueError(
                f"end_to_end.batch_tokens ({self.batch_tokens}) exceeds train_tokens ({self.train_tokens}); "
                "a step cannot use more tokens than the training sample holds"
            )
        return self

    def block_for(self, site: PermutationSite) -> int:
        """Channels per learned permutation: attn_vo's head, else ``block`` (None: the whole site)."""
        if site.block_size is not None:
            return site.block_size
        return site.size if self.block is None else self.block


def split_sample(sample: dict, held_out_tokens: int, batch_tokens: int) -> tuple[list[dict], dict]:
    """A right-padded sample (``selection.calibration_sample``) as training batches of at most
    ``batch_tokens`` tokens and, from its last rows, a held-out batch of at least ``held_out_tokens``."""
    lengths = sample["attention_mask"].sum(dim=1)
    from_end = lengths.flip(0).cumsum(0).flip(0)  # tokens in this row and every later one
    first_held = int((from_end >= held_out_tokens).nonzero().max()) if bool(from_end[0] >= held_out_tokens) else 0
    if first_held == 0:
        raise ValueError(
            f"end_to_end: the calibration sample holds {int(lengths.sum())} tokens, too few to keep "
            f"{held_out_tokens} held-out tokens apart from the training rows; lower held_out_tokens or "
            "pass more calibration data"
        )
    batches, start, total = [], 0, 0
    for row in range(first_held):
        if total and total + int(lengths[row]) > batch_tokens:
            batches.append(_rows(sample, start, row))
            start, total = row, 0
        total += int(lengths[row])
    batches.append(_rows(sample, start, first_held))
    return batches, _rows(sample, first_held, len(lengths))


def _rows(sample: dict, start: int, stop: int) -> dict:
    mask = sample["attention_mask"][start:stop]
    width = int(mask.sum(dim=1).max())
    return {"input_ids": sample["input_ids"][start:stop, :width], "attention_mask": mask[:, :width]}


class EndToEndLearning:
    """Learns further permutations of ``sites`` on the model as folded so far; ``pruned`` are the
    Linears the pruner prunes, ``act_sq`` their input energy in the current order."""

    def __init__(
        self,
        model: nn.Module,
        sites: list[PermutationSite],
        pruned: list[nn.Linear],
        act_sq: dict[nn.Module, torch.Tensor],
        pruner: PrunerModel,
        args: EndToEndArgs,
        device: torch.device | str,
    ):
        self.model, self.sites, self.pruned, self.act_sq = model, sites, pruned, act_sq
        self.pruner, self.args, self.device = pruner, args, device
        self.site_of = {named.module: site for site in sites for named in site.consumer_modules if named.module in act_sq}
        self._orders: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # site -> (consumer plan, consumer columns)
        self._recorded: list[torch.Tensor] | None = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ public

    def run(self, batches: list[dict], held_out: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """The permutation of each site to fold next (identity where nothing beat the start) and a report."""
        start_time = time.perf_counter()
        targets = [self._dense_targets(batch) for batch in batches]
        held_targets = self._dense_targets(held_out)
        identity = {site.name: torch.arange(site.size) for site in self.sites}
        held_losses = {"start": self.loss(held_out, held_targets, identity)["total"]}
        kept = {"start": identity}
        check_steps = {round(self.args.steps * (k + 1) / self.args.checks) for k in range(self.args.checks)}
        learn = self._gradient_steps if self.args.search == "gradient" else self._random_steps
        for step, orders in learn(batches, targets):
            if step in check_steps:
                label = f"step {step}"
                held_losses[label] = self.loss(held_out, held_targets, orders)["total"]
                kept[label] = orders
        chosen = min(held_losses, key=held_losses.get)
        report = {
            "sites": [site.name for site in self.sites], **self.args.model_dump(),
            "held_out_losses": held_losses, "chosen": chosen,
            "moved_channels": {name: int((perm != identity[name]).sum()) for name, perm in kept[chosen].items()},
            "train_losses": [round(entry["total"], 5) for entry in self.history],
            "seconds": round(time.perf_counter() - start_time, 3),
        }
        logger.info(f"end-to-end: held-out loss {held_losses['start']:.4f} (start) -> "
                    f"{held_losses[chosen]:.4f} ({chosen}), {report['seconds']:.1f}s")
        return kept[chosen], report

    @torch.no_grad()
    def loss(self, batch: dict, targets: dict, orders: dict[str, torch.Tensor]) -> dict[str, float]:
        """The loss parts of the model pruned in simulation with ``orders`` (site -> column order)."""
        self._set_orders({name: (None, perm) for name, perm in orders.items()})
        with self._simulation():
            return {key: float(value) for key, value in self._loss(batch, targets).items()}

    # ------------------------------------------------------------------ learning loops

    def _gradient_steps(self, batches, targets) -> Iterator[tuple[int, dict]]:
        args = self.args
        logits = {site.name: block_logits(site.size, args.block_for(site), args.init_scale).to(self.device).requires_grad_()
                  for site in self.sites}
        optimizer = torch.optim.Adam(logits.values(), lr=args.lr)
        progress = tqdm(range(args.steps), desc="End-to-end permutation learning", leave=False)
        for step in progress:
            temperature = annealed_temperature(step, args.steps, *args.temperature)
            with torch.enable_grad():
                self._set_orders({name: (soft_permutation(value, temperature, args.sinkhorn_iters), hard_columns(value))
                                  for name, value in logits.items()})
                with self._simulation(checkpointed=True):  # backward recomputes layers: still masked
                    parts = self._loss(batches[step % len(batches)], targets[step % len(targets)])
                    optimizer.zero_grad()
                    parts["total"].backward()
            optimizer.step()
            self._record(progress, {key: float(value.detach()) for key, value in parts.items()}, temperature)
            yield step + 1, {name: hard_columns(value.detach()).cpu() for name, value in logits.items()}

    def _random_steps(self, batches, targets) -> Iterator[tuple[int, dict]]:
        generator = torch.Generator().manual_seed(0)
        best = {site.name: torch.arange(site.size) for site in self.sites}
        progress = tqdm(range(self.args.steps), desc="End-to-end random search", leave=False)
        for step in progress:
            batch, target = batches[step % len(batches)], targets[step % len(targets)]
            candidate = {site.name: self._shuffled(site, best[site.name], generator) for site in self.sites}
            best_parts, parts = self.loss(batch, target, best), self.loss(batch, target, candidate)
            if parts["total"] < best_parts["total"]:
                best = candidate
            self._record(progress, min(parts, best_parts, key=lambda p: p["total"]), None)
            yield step + 1, best

    def _shuffled(self, site: PermutationSite, perm: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``perm`` with ``shuffle_fraction`` of the channels of every block shuffled among themselves."""
        block = self.args.block_for(site)
        count = max(2, round(block * self.args.shuffle_fraction))
        positions = torch.rand(site.size // block, block, generator=generator).argsort(dim=1)[:, :count]
        mixed = positions.gather(1, torch.rand(positions.shape, generator=generator).argsort(dim=1))
        rows = perm.reshape(-1, block)
        shuffled = rows.clone()
        shuffled.scatter_(1, positions, rows.gather(1, mixed))
        return shuffled.flatten()

    def _record(self, progress, parts: dict[str, float], temperature: float | None) -> None:
        self.history.append(parts)
        progress.set_postfix(loss=f"{parts['total']:.4f}", **({"T": f"{temperature:.3f}"} if temperature else {}))

    # ------------------------------------------------------------------ the simulated model

    def _set_orders(self, orders: dict[str, tuple[torch.Tensor | None, torch.Tensor]]) -> None:
        """Per site: (soft plan or None, hard column order), turned into each consumer's view
        (GQA: every query head of a KV head reads that head's permutation)."""
        self._orders = {}
        for site in self.sites:
            plan, columns = orders[site.name]
            columns = site.consumer_column_index(columns.to(self.device))
            if plan is not None and site.query_groups > 1:
                plan = plan.repeat_interleave(site.query_groups, dim=0)
            self._orders[site.name] = (plan, columns)

    def _weight(self, module: nn.Linear) -> torch.Tensor:
        weight = module.weight
        scores = pruning_score(self.pruner.score, weight, act_sq=self.act_sq[module].to(weight.device))
        site = self.site_of.get(module)
        if site is None:
            return weight * nm_mask(scores, self.pruner.n, self.pruner.m)
        plan, columns = self._orders[site.name]
        if plan is None:  # no gradient wanted: the same forward, without the straight-through graph
            return weight * mask_in_original_order(scores, columns, self.pruner.n, self.pruner.m)
        return pruned_in_order(weight, scores, plan, columns, self.pruner.n, self.pruner.m)

    @contextlib.contextmanager
    def _simulation(self, masked: bool = True, checkpointed: bool = False):
        """The model with every pruned Linear masked in the current orders (``masked``; no weight
        changes), hooks of other modifiers off, weights frozen, decoder layer outputs recordable; each
        decoder layer under gradient checkpointing if asked."""
        model = self.model
        with contextlib.ExitStack() as stack:
            stack.enter_context(HooksMixin.disable_hooks())
            stack.enter_context(disable_cache(model))
            stack.enter_context(eval_context(model))
            stack.enter_context(patch_attr(model.config, "_attn_implementation", "sdpa"))
            frozen = [p for p in model.parameters() if p.requires_grad]
            for parameter in frozen:
                parameter.requires_grad_(False)
            stack.callback(lambda: [p.requires_grad_(True) for p in frozen])
            for module in self.pruned if masked else ():
                stack.enter_context(instance_forward(module, self._linear_forward(module)))
            for layer in model.get_decoder().layers:
                stack.enter_context(instance_forward(layer, self._layer_forward(layer.forward, checkpointed)))
            yield

    def _linear_forward(self, module: nn.Linear):
        def forward(inputs):
            return F.linear(inputs, self._weight(module), module.bias)
        return forward

    def _layer_forward(self, forward, checkpointed: bool):
        def run(*args, **kwargs):
            if checkpointed and torch.is_grad_enabled():
                output = checkpoint(forward, *args, use_reentrant=False, **kwargs)
            else:
                output = forward(*args, **kwargs)
            if self._recorded is not None:
                self._recorded.append(output[0] if isinstance(output, tuple) else output)
            return output
        return run

    # ------------------------------------------------------------------ loss

    @torch.no_grad()
    def _dense_targets(self, batch: dict) -> dict:
        """The dense model's final hidden states at the scored positions and, if ``hidden`` weighs, every
        decoder layer's output at the real tokens (the folded model computes what the dense one did)."""
        with self._simulation(masked=False):
            final, layers = self._decoder(batch)
        mask, valid = self._masks(batch)
        return {"final": final[:, :-1][valid], "layers": [h[mask] for h in layers]}

    def _decoder(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._recorded = [] if self.args.hidden > 0 else None
        try:
            output = self.model.get_decoder()(input_ids=batch["input_ids"].to(self.device),
                                              attention_mask=batch["attention_mask"].to(self.device))
            return output.last_hidden_state, self._recorded or []
        finally:
            self._recorded = None

    def _masks(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["attention_mask"].to(self.device).bool()
        return mask, predicting_positions(mask)

    def _loss(self, batch: dict, targets: dict) -> dict[str, torch.Tensor]:
        args = self.args
        final, layers = self._decoder(batch)
        mask, valid = self._masks(batch)
        hidden, labels = final[:, :-1][valid], batch["input_ids"].to(self.device)[:, 1:][valid]
        ce, kl = head_losses(self.model.get_output_embeddings(), hidden, labels,
                             targets["final"] if args.kl else None)
        count = max(len(labels), 1)
        parts = {"ce": ce / count, "kl": kl / count}
        if args.hidden > 0:
            parts["hidden"] = torch.stack([
                (h[mask] - dense).square().sum() / dense.square().sum().clamp_min(1e-12)
                for h, dense in zip(layers, targets["layers"])
            ]).mean()
        parts["total"] = args.ce * parts["ce"] + args.kl * parts["kl"] + args.hidden * parts.get("hidden", 0.0)
        return parts

