"""Whole-model choice among permutation configurations, on a bounded calibration sample.

On the models we measured, neither the layer-wise objective nor the pruner's per-Linear error ranks
permutations the way held-out text does, while the calibration loss of the pruned model does
(``results/ablations/``). So a configuration (a column order for every Linear whose input a
permutation re-orders) is scored by the KL divergence of the pruned model's predictions from the
dense model's on the calibration sample: every targeted Linear pruned the way the pruner would prune
it in the configuration's order (Wanda: its N:M mask; SparseGPT: its mask and OBS weight update), one
pass per configuration; the dense side comes from the modifier's own statistics pass, at no extra
forward. Pruning reads the statistics llm-compressor's sequential pipeline gives the pruner (each
layer's from the already pruned layers' outputs), so each layer runs twice per configuration: densely
to gather them, then pruned. Each simulated Linear's ``forward`` is replaced for the pass (not hooked
after it, which would compute every product twice); Wanda's masks are computed once per layer from
the weight and the input energy and kept bit-packed for the layer's other row chunks (memory: one
Linear's scores, and 1/32 of the layer's fp32 weights), SparseGPT's weights once per layer (memory:
one layer's Hessians and weights), and each module is onloaded only for its own forward (offload-safe).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from compressed_tensors.offload import disable_offloading
from compressed_tensors.utils import patch_attr
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.dev import get_main_device
from llmcompressor.utils.helpers import disable_cache, eval_context

from learned_permutation.math import nm_mask
from learned_permutation.math import score as pruning_score
from learned_permutation.math.masks import pack_bits, unpack_bits
from learned_permutation.math.objectives import mask_in_original_order
from learned_permutation.math.threads import solver_threads
from learned_permutation.plugin.pruner_model import PrunerModel
from learned_permutation.plugin.statistics import InputStatistics
from learned_permutation.structure.offload import read_parameter

__all__ = [
    "SimulatedPruning",
    "calibration_sample",
    "scored_final_hidden",
    "head_losses",
    "instance_forward",
    "leading_rows",
    "predicting_positions",
    "prediction_losses",
    "attention_mask_of",
    "layer_chunks",
    "layer_output",
    "run_layer",
    "LAYER_CHUNK_TOKENS",
    "head_chunk_tokens",
]

# Logits are computed for this many (token, vocabulary entry) pairs at a time: 8 MiB per fp32 tensor, and the
# KL holds about five such (logits, log-probabilities of both sides, the divergence's temporaries); a fixed
# token count would not do: 1,024 tokens x Llama-3's 128k vocabulary are 512 MiB per tensor.
HEAD_CHUNK_ELEMENTS = 1 << 21


def head_chunk_tokens(vocabulary: int) -> int:
    """Tokens whose logits fit ``HEAD_CHUNK_ELEMENTS`` (at least one)."""
    return max(1, HEAD_CHUNK_ELEMENTS // vocabulary)

# Tokens per decoder-layer call in ``scored_final_hidden`` (whole rows, at least one): a layer's MLP holds
# three to four intermediate-wide activations per token, about ``tokens / hidden`` of its own fp32 weights.
# 1,024-token chunks put a quarter of Llama-3.2-1B's layer (hidden 1024) over the bound of one layer's
# weights plus the sample's hidden states (results/scale/layer_pass_memory.md); 512 tokens is also one row
# of the usual calibration set, the batch llm-compressor's own pipeline runs each layer on.
LAYER_CHUNK_TOKENS = 512


class SimulatedPruning:
    """Linears made to compute with their N:M-pruned weights, in a candidate's order.

    ``modules``: the Linears to simulate. A candidate is a column order per Linear whose input a
    permutation would re-order (``column_orders``: the pruner works on ``W[:, order]``, the result is
    scattered back); the others are pruned as stored. Pruning reads the statistics llm-compressor's
    sequential pipeline gives the pruner (``propagate_error``): every decoder layer first runs densely on
    the already pruned layers' outputs to gather its inputs' energy (Wanda) or Hessians (SparseGPT),
    then runs pruned. With SparseGPT (``pruner.obs_block_size``) the pruned weights are SparseGPT's own
    (llm-compressor's ``sparsify_weight``: its mask and OBS update), one layer's at a time.
    """

    def __init__(self, modules: Iterable[nn.Linear], pruner: PrunerModel, device: torch.device | str | None = None):
        self.modules, self.pruner, self.device = list(modules), pruner, device
        self.column_orders: dict[nn.Module, torch.Tensor] = {}
        self._reset()

    @property
    def updates_weights(self) -> bool:
        return self.pruner.obs_block_size is not None

    def _reset(self) -> None:
        self.statistics = InputStatistics(full=self.updates_weights)  # per distinct input of the layer
        self.reads_as: dict[nn.Module, nn.Module] = {}  # Linear -> the first Linear that read the same input
        self.last_read: tuple[nn.Module, torch.Tensor] | None = None
        self.updated: dict[nn.Module, torch.Tensor] = {}  # SparseGPT's weights of the current layer
        self.masks: dict[nn.Module, torch.Tensor] = {}  # the pruner's masks of the current layer, bit-packed
        self.observing = False

    def losses(self, model: nn.Module, batch: dict, dense: torch.Tensor | None, column_orders: dict) -> dict[str, float]:
        """``prediction_losses`` of ``model`` with the simulated Linears pruned in ``column_orders``."""
        self.column_orders = column_orders
        self._reset()
        try:
            with contextlib.ExitStack() as stack:
                for module in self.modules:
                    stack.enter_context(instance_forward(module, partial(self._pruned_forward, module)))
                with HooksMixin.disable_hooks():  # no other modifier observes these passes
                    return prediction_losses(model, batch, dense, self.device, observe=self._observe)
        finally:
            self._reset()

    @contextlib.contextmanager
    def _observe(self, _index: int) -> Iterator[None]:
        """A layer's dense calibration pass: its Linears gather their inputs' statistics (once per input
        that several read, as q/k/v or gate/up do); with SparseGPT they are then pruned as SparseGPT
        would (the previous layer's weights dropped first)."""
        self.updated, self.masks, self.observing = {}, {}, True
        try:
            yield
        finally:
            self.observing, self.last_read = False, None
        if self.updates_weights:
            groups: dict[nn.Module, list[nn.Module]] = {}
            for module, first in self.reads_as.items():
                groups.setdefault(first, []).append(module)
            for first, readers in groups.items():
                self.updated |= self._sparsegpt_weights(readers, self.statistics.sums.pop(first))
            self.reads_as = {}

    def _sparsegpt_weights(self, readers: list[nn.Linear], hessian: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
        """llm-compressor's SparseGPT result for Linears that read one input, their columns in the
        candidate's order, back in the stored order. SparseGPT treats every weight row alone given the
        Hessian, so the readers' rows are pruned in one call when they share a column order."""
        orders = [self.column_orders.get(module) for module in readers]
        if any(not _same_order(order, orders[0]) for order in orders[1:]):
            return {module: self._sparsegpt_weights([module], hessian.clone())[module] for module in readers}
        weights = [read_parameter(module, "weight") for module in readers]  # outside any forward: onloaded here
        weight, order = torch.cat(weights), orders[0]
        if order is not None:
            order = order.to(weight.device)
            weight, hessian = weight[:, order], hessian[order][:, order]
        stand_in = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        stand_in.weight = nn.Parameter(weight, requires_grad=False)
        pruner = self.pruner
        _, pruned = sparsify_weight(stand_in, {stand_in: hessian}, pruner.n / pruner.m, pruner.n, pruner.m,
                                    pruner.obs_block_size, pruner.obs_dampening, False)
        if order is not None:
            pruned = pruned[:, torch.argsort(order)]
        return dict(zip(readers, pruned.split([w.shape[0] for w in weights])))

    def _record_input(self, module: nn.Linear, inputs: torch.Tensor) -> None:
        """Accumulate ``inputs`` once however many Linears read that very tensor (they follow each other)."""
        if self.last_read is not None and self.last_read[1] is inputs:
            first = self.reads_as[self.last_read[0]]
        else:
            first = module
            self.statistics.accumulate(module, inputs)
        if self.reads_as.setdefault(module, first) is not first:
            raise RuntimeError("a Linear read the same input as another in one chunk and not in another")
        self.last_read = (module, inputs)

    def _pruned_forward(self, module: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if self.observing:
            self._record_input(module, inputs)
            return F.linear(inputs, weight, module.bias)
        if module in self.updated:
            return F.linear(inputs, self.updated[module].to(inputs.dtype), module.bias)
        with solver_threads():  # element-wise work on one weight: one thread (``math/threads.py``)
            pruned = weight * self._layer_mask(module, weight)
        return F.linear(inputs, pruned, module.bias)

    def _layer_mask(self, module: nn.Linear, weight: torch.Tensor) -> torch.Tensor:
        """``module``'s mask, computed on the layer's first chunk and kept bit-packed for its other chunks
        (the statistics are final once the layer's calibration pass has run): the mask costs about three
        of the chunk's products, its packed copy 1/32 of the weight's memory."""
        packed = self.masks.get(module)
        if packed is not None:
            return unpack_bits(packed, weight.shape[1])
        energy = self.statistics.sums[self.reads_as.get(module, module)]
        kept = self._kept(weight, energy, self.column_orders.get(module))
        self.masks[module] = pack_bits(kept)
        return kept

    def _kept(self, weight: torch.Tensor, energy: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """The pruner's N:M mask of ``weight`` in ``order`` (its scores freed before the pruned copy is made)."""
        pruner = self.pruner
        scores = pruning_score(pruner.score, weight, act_sq=energy.to(weight.device))
        if order is None:
            return nm_mask(scores, pruner.n, pruner.m)
        return mask_in_original_order(scores, order.to(weight.device), pruner.n, pruner.m)


def _same_order(first: torch.Tensor | None, second: torch.Tensor | None) -> bool:
    return (first is None and second is None) or (first is not None and second is not None and torch.equal(first, second))


@contextlib.contextmanager
def instance_forward(module: nn.Module, forward) -> Iterator[None]:
    """``module.forward`` replaced for the block, and the class's own restored after (no instance attribute left)."""
    had_own = "forward" in module.__dict__
    original = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = original
        else:
            del module.forward


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


def leading_rows(sample: dict, tokens: int) -> tuple[dict, int]:
    """The first rows of ``sample`` (hash-ordered, from ``calibration_sample``) that hold at most
    ``tokens`` tokens (at least one row), and how many of ``sample``'s scored positions they own
    (those come first, as positions are flattened row by row)."""
    mask = sample["attention_mask"]
    rows = max(1, int((mask.sum(dim=1).cumsum(0) <= tokens).sum()))
    part = {key: value[:rows] for key, value in sample.items()}
    scored = int(predicting_positions(part["attention_mask"]).sum())
    return part, scored


def _right_padded(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=rows[0][0].dtype)
    attention_mask = torch.zeros(len(rows), width, dtype=rows[0][1].dtype)
    for index, (ids, mask) in enumerate(rows):
        input_ids[index, : len(ids)] = ids
        attention_mask[index, : len(mask)] = mask
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def predicting_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[rows, len - 1]`` bool: position ``t`` is real and so is the token ``t + 1`` it predicts."""
    return (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()


def head_losses(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, dense: torch.Tensor | None = None):
    """Summed next-token cross-entropy of ``hidden`` (scored positions) and, given the dense model's
    hidden states at the same positions, summed KL(dense || model), ``head_chunk_tokens`` at a time so
    the logits never exceed one chunk. Differentiable in ``hidden``; the dense side is a constant."""
    ce = kl = hidden.new_zeros((), dtype=torch.float32)
    tokens = head_chunk_tokens(head.weight.shape[0])
    dense_parts = dense.split(tokens) if dense is not None else [None] * len(hidden.split(tokens))
    for part, label, dense_part in zip(hidden.split(tokens), labels.split(tokens), dense_parts):
        log_probs = F.linear(part, head.weight, head.bias).float().log_softmax(dim=-1)
        ce = ce + F.nll_loss(log_probs, label, reduction="sum")
        if dense_part is not None:
            with torch.no_grad():
                dense_log_probs = F.linear(dense_part, head.weight, head.bias).float().log_softmax(dim=-1)
            kl = kl + F.kl_div(log_probs, dense_log_probs, log_target=True, reduction="sum")
    return ce, kl


@torch.no_grad()
def scored_final_hidden(
    model: nn.Module,
    batch: dict,
    device: torch.device | str | None = None,
    after_layer: Callable[[int], None] | None = None,
    observe: Callable[[int], contextlib.AbstractContextManager] | None = None,
    leading_positions: int | None = None,
) -> torch.Tensor:
    """The decoder's last hidden states at the positions of ``batch`` that predict a next token (every
    non-padded position but each row's last; ``predicting_positions``), computed layer by layer over row
    chunks; only the first ``leading_positions`` of them when given.

    Each decoder layer runs on ``LAYER_CHUNK_TOKENS`` tokens at a time (whole rows) before the next
    layer starts, as llm-compressor's sequential pipeline does: activations inside a layer are one
    chunk's, whatever the sample size; between layers only the sample's hidden states are kept. An
    offloaded layer is onloaded once per pass, not once per chunk, and released before ``after_layer``.
    ``after_layer(index)`` is called once every chunk has passed layer ``index``; with ``observe``, each
    layer first runs on every chunk inside ``observe(index)`` with its outputs dropped (a calibration
    pass, as llm-compressor's sequential pipeline runs before compressing the layer).
    Runs with the KV cache off and the model in eval mode: inside llm-compressor's calibration the
    lm_head's forward is patched to return meta tensors, so heads are applied here by ``head_losses``.
    Attention runs as ``sdpa`` (llm-compressor forces eager attention for its traced subgraphs; this
    plain forward does not need it, and eager is slower). ``device``: where the inputs go (default:
    llm-compressor's main device).
    """
    device = get_main_device() if device is None else device
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    with disable_cache(model), eval_context(model), patch_attr(model.config, "_attn_implementation", "sdpa"):
        chunks, masks = layer_chunks(decoder, batch, device)
        for index, layer in enumerate(layers):
            with disable_offloading():  # the layer's weights onloaded once for all its chunks, released after
                if observe is not None:
                    with observe(index):
                        run_layer(layer, index, chunks, keep=False)
                run_layer(layer, index, chunks, keep=True)
            if after_layer is not None:
                after_layer(index)
        scored, wanted = [], leading_positions
        for chunk, mask in zip(chunks, masks):  # each chunk's states freed as its scored ones are kept
            if wanted is None or wanted > 0:
                scored.append(decoder.norm(chunk.hidden)[:, :-1][predicting_positions(mask)][:wanted])
                wanted = None if wanted is None else wanted - len(scored[-1])
            chunk.hidden = None
        return torch.cat(scored)


def layer_chunks(decoder: nn.Module, batch: dict, device) -> tuple[list[_LayerInputs], list[torch.Tensor]]:
    """``batch`` in ``LAYER_CHUNK_TOKENS`` row chunks (whole rows) ready for the first decoder layer, and each
    chunk's attention mask, both on ``device``."""
    rows = max(1, LAYER_CHUNK_TOKENS // batch["input_ids"].shape[1])
    masks = list(attention_mask_of(batch).to(device).split(rows))
    layers = list(decoder.layers)
    chunks = [layer_inputs(decoder, layers, ids.to(device), mask) for ids, mask in zip(batch["input_ids"].split(rows), masks)]
    return chunks, masks


def run_layer(layer: nn.Module, index: int, chunks: list[_LayerInputs], keep: bool) -> None:
    """Layer ``index`` on every chunk; ``keep``: its outputs become the chunks' hidden states."""
    for chunk in chunks:
        args, kwargs = chunk.calls[index]
        output = layer_output(layer(chunk.hidden, *args, **kwargs))
        if keep:
            chunk.hidden = output


@dataclass
class _LayerInputs:
    """One row chunk's hidden states and, per decoder layer, the other arguments the decoder passes it
    (position embeddings, the mask of that layer's attention type)."""

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict]]


def layer_inputs(decoder: nn.Module, layers: list[nn.Module], input_ids, attention_mask) -> _LayerInputs:
    """The decoder's own forward with every layer an identity that records its call: the embeddings and
    each layer's arguments as the decoder builds them, at the cost of the embedding lookup."""
    calls, embedded = [], []

    def record(hidden, *args, **kwargs):
        if not embedded:
            embedded.append(hidden)
        calls.append((args, kwargs))
        return hidden

    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(instance_forward(layer, record))
        decoder(input_ids=input_ids, attention_mask=attention_mask)
    if len(calls) != len(layers):
        raise RuntimeError(f"the decoder called {len(calls)} of its {len(layers)} layers once each; expected all")
    return _LayerInputs(embedded[0], calls)


def layer_output(output) -> torch.Tensor:
    """A decoder layer's hidden states (transformers 5 returns them alone, earlier versions in a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def prediction_losses(
    model: nn.Module,
    batch: dict,
    dense: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    observe: Callable[[int], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """Mean next-token cross-entropy (``ce``) over the non-padded tokens of ``batch`` and, given the
    dense model's ``scored_final_hidden`` on it, mean KL(dense || model) (``kl``): the divergence sees the
    whole predicted distribution rather than one sampled token, so it ranks candidates with far less
    noise than the cross-entropy on the same tokens. ``observe``: as in ``scored_final_hidden``."""
    batch = {**batch, "attention_mask": attention_mask_of(batch)}
    hidden = scored_final_hidden(model, batch, device, observe=observe)
    if hidden.shape[0] == 0:
        raise ValueError("the calibration data holds no pair of consecutive tokens to score")
    labels = batch["input_ids"][:, 1:][predicting_positions(batch["attention_mask"])].to(hidden.device)
    ce, kl = head_losses(model.get_output_embeddings(), hidden, labels, dense)
    losses = {"ce": float(ce) / len(labels)}
    if dense is not None:
        losses["kl"] = float(kl) / len(labels)
    return losses


def attention_mask_of(batch: dict) -> torch.Tensor:
    """The batch's attention mask, all ones where it has none."""
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"]) if mask is None else mask
