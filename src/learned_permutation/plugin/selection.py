"""End-to-end choice of a site's permutation among candidates.

On the models we measured, the layer-wise objective ranks permutations poorly: candidates whose
objectives differ by a fraction of a percent give pruned models whose perplexities differ by tens of
percent (``docs/results.md``), while the calibration loss of the pruned model ranks them as the
held-out loss does. So ``method: learned`` ranks each site's candidates by that loss: the model with
the Linears a site affects masked the way the pruner would mask them (its score's N:M mask in the
candidate's channel order, no weight update). Masks are computed per call from the weight and the
input energy, so memory stays one layer's mask; each candidate costs one forward pass over the
calibration batches, packed to about ``TOKENS_PER_BATCH`` tokens each (llm-compressor hands the
calibration set over one sample at a time, which makes a small model's passes overhead-bound).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compressed_tensors.utils import patch_attr
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.dev import get_main_device
from llmcompressor.utils.helpers import disable_cache, eval_context

from learned_permutation.math import nm_mask
from learned_permutation.math import score as pruning_score
from learned_permutation.math.objectives import mask_in_original_order

__all__ = ["SimulatedPruning", "next_token_loss", "packed_batches"]

TOKENS_PER_BATCH = 8192  # bounds the logits: 8192 x 128k vocabulary x 4 bytes = 4 GiB at most


class SimulatedPruning:
    """Forward hooks that make Linears compute with their N:M-pruned weights, in a candidate's order.

    ``act_sq`` maps every Linear to simulate to its input energy (what the score needs). A candidate
    is a column order per Linear whose input a permutation would re-order (``column_orders``: the
    pruner's mask is taken on ``W[:, order]`` and scattered back); the others are masked as stored.
    """

    def __init__(
        self,
        hooks: HooksMixin,
        act_sq: dict[nn.Linear, torch.Tensor],
        score_kind: str,
        n: int,
        m: int,
        device: torch.device | str | None = None,
    ):
        self.hooks, self.act_sq, self.score_kind, self.n, self.m = hooks, act_sq, score_kind, n, m
        self.device = device
        self.column_orders: dict[nn.Module, torch.Tensor] = {}

    def loss(self, model: nn.Module, batches: Iterable[dict], column_orders: dict, label: str) -> float:
        """Calibration loss of ``model`` with the simulated Linears pruned in ``column_orders``."""
        self.column_orders = column_orders
        handles = {self.hooks.register_hook(module, self._pruned_forward, "forward") for module in self.act_sq}
        try:
            with HooksMixin.disable_hooks(keep=handles):
                return next_token_loss(model, tqdm(batches, desc=f"Candidate {label}", leave=False), self.device)
        finally:
            self.hooks.remove_hooks(handles)

    def _pruned_forward(self, module: nn.Linear, args: tuple, _output) -> torch.Tensor:
        weight = module.weight
        scores = pruning_score(self.score_kind, weight, act_sq=self.act_sq[module].to(weight.device))
        order = self.column_orders.get(module)
        if order is None:
            keep = nm_mask(scores, self.n, self.m)
        else:
            keep = mask_in_original_order(scores, order.to(weight.device), self.n, self.m)
        return F.linear(args[0], weight * keep, module.bias)


def packed_batches(batches: Iterable[dict], tokens_per_batch: int = TOKENS_PER_BATCH) -> list[dict]:
    """The rows of ``batches`` regrouped into batches of at most ``tokens_per_batch`` tokens (at least
    one row each), right-padded with masked positions: a causal model computes every row's logits
    exactly as before, so the loss is unchanged."""
    rows = []
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows.extend(zip(ids, mask))
    packed, group = [], []
    for row in rows:
        width = max(len(r[0]) for r in group + [row])
        if group and (len(group) + 1) * width > tokens_per_batch:
            packed.append(_right_padded(group))
            group = []
        group.append(row)
    if group:
        packed.append(_right_padded(group))
    return packed


def _right_padded(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=rows[0][0].dtype)
    attention_mask = torch.zeros(len(rows), width, dtype=rows[0][1].dtype)
    for index, (ids, mask) in enumerate(rows):
        input_ids[index, : len(ids)] = ids
        attention_mask[index, : len(mask)] = mask
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def next_token_loss(model: nn.Module, batches: Iterable[dict], device: torch.device | str | None = None) -> float:
    """Mean next-token cross-entropy over the non-padded tokens of ``batches``.

    Runs the decoder and applies the output embedding itself, with the KV cache off and the model in
    eval mode: inside llm-compressor's calibration the lm_head's forward is patched to return meta
    tensors, and the loss needs the logits. Attention runs as ``sdpa`` (llm-compressor forces eager
    attention for its traced subgraphs; this plain forward does not need it, and eager is slower).
    ``device``: where the inputs go (default: llm-compressor's main device).
    """
    device = get_main_device() if device is None else device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    total, count = 0.0, 0
    with disable_cache(model), eval_context(model), patch_attr(model.config, "_attn_implementation", "sdpa"):
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
            valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
            logits = F.linear(hidden[valid], head.weight, head.bias).float()
            total += float(F.cross_entropy(logits, input_ids[:, 1:][valid], reduction="sum"))
            count += int(valid.sum())
    if count == 0:
        raise ValueError("the calibration data holds no pair of consecutive tokens to score")
    return total / count
