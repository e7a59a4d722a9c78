"""Whole-model choice of the residual permutation among candidates, on a bounded calibration sample.

The residual permutation is shared by every layer, and on the models we measured the layer-wise
objective ranks its candidates poorly, while the calibration loss of the pruned model ranks them as
the held-out loss does (``docs/results.md``). So each residual candidate is scored by that loss: the
model with every targeted Linear masked the way the pruner would mask it (its score's N:M mask in
the candidate's channel order, no weight update), one forward pass over ``calibration_sample``
tokens per candidate. Masks are computed per call from the weight and the input energy, so memory
stays one Linear's mask, and each module is onloaded only for its own forward (offload-safe).
"""

from __future__ import annotations

import hashlib
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

__all__ = ["SimulatedPruning", "calibration_sample", "next_token_loss"]

HEAD_CHUNK_TOKENS = 1024  # logits are computed this many tokens at a time: 1024 x 128k vocabulary x 4 B = 512 MiB


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


def calibration_sample(batches: Iterable[dict], tokens: int) -> dict:
    """At most ``tokens`` calibration tokens as one right-padded batch (causal models score each row
    as if alone), the same whatever order the calibration set comes in: rows are taken in the
    order of a hash of their tokens. llm-compressor shuffles calibration samples with an unseeded
    sampler by default, so taking the first rows would make every decision depend on that shuffle."""
    rows = []
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows.extend(row[keep.bool()] for row, keep in zip(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1])))
    rows.sort(key=lambda row: hashlib.sha256(row.cpu().numpy().tobytes()).digest())
    chosen, total = [], 0
    for row in rows:
        row = row[: tokens - total]
        if len(row) < 2:
            break
        chosen.append((row, torch.ones_like(row)))
        total += len(row)
    if not chosen:
        raise ValueError("the calibration data holds no row of at least two tokens")
    return _right_padded(chosen)


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
            targets = input_ids[:, 1:][valid]
            for part, target in zip(hidden[valid].split(HEAD_CHUNK_TOKENS), targets.split(HEAD_CHUNK_TOKENS)):
                logits = F.linear(part, head.weight, head.bias).float()
                total += float(F.cross_entropy(logits, target, reduction="sum"))
            count += int(valid.sum())
    if count == 0:
        raise ValueError("the calibration data holds no pair of consecutive tokens to score")
    return total / count
