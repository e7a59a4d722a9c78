"""How much the dense model's calibration loss moves per unit of error in each output row of a Linear.

The residual permutation is shared by every q/k/v/gate/up_proj of every layer, and the pruning error it
trades between them does not matter equally: an error in an early layer's readers is carried by every
later layer. The layer-wise objective weights every row's error alike and ranks residual orders no better
than chance (results/ablations/residual_signal_smollm2.md). Weighting each row by the empirical Fisher
information of its output, the squared gradient of the dense model's next-token cross-entropy summed over
calibration tokens, is the diagonal second-order estimate of the loss that row's error costs.

The gradients come from one forward and one backward sweep over a few calibration rows, layer by layer.
The forward keeps the input hidden states of every ``stride``-th decoder layer (``stride`` about the square
root of the depth) in host memory, in the model's dtype; the backward takes the segments from the last: it
recomputes a segment's layer inputs from its kept one, then onloads one layer at a time, recomputes it
from its input and passes the gradient on. So at most about twice the square root of the depth in layer
inputs (tokens x hidden each) wait at once, for one more forward: 11 of SmolLM2-135M's 30 (52 MB at 2,048
tokens in fp32, against 142 MB for all 30), 18 of a 70B model's 80. Autograd never holds more than one layer's
activations for one row chunk.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.utils import patch_attr
from torch import nn

from llmcompressor.utils.dev import get_main_device
from llmcompressor.utils.helpers import disable_cache, eval_context

from learned_permutation.plugin.selection import (
    head_chunk_tokens,
    head_losses,
    layer_chunks,
    layer_output,
    predicting_positions,
    run_layer,
)

__all__ = ["output_row_fisher", "checkpoint_stride"]


def checkpoint_stride(depth: int) -> int:
    """Layers per recomputed segment: the square root of ``depth``, rounded up, minimises the kept inputs
    (``depth / stride`` checkpoints plus one segment's ``stride``)."""
    return max(1, math.ceil(math.sqrt(depth)))


def output_row_fisher(
    model: nn.Module, batch: dict, modules: list[list[nn.Linear]], device: torch.device | str | None = None
) -> dict[nn.Linear, torch.Tensor]:
    """Per output row of each Linear of ``modules`` (``modules[i]``: Linears inside decoder layer ``i``), the
    sum over ``batch``'s predicting positions of the squared gradient of the dense model's next-token
    cross-entropy with respect to that row's output (fp32, on the CPU)."""
    device = get_main_device() if device is None else device
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    fisher = {module: torch.zeros(module.out_features) for inside in modules for module in inside}
    stride = checkpoint_stride(len(layers))
    with disable_cache(model), eval_context(model), patch_attr(model.config, "_attn_implementation", "sdpa"):
        with torch.no_grad():
            chunks, masks = layer_chunks(decoder, batch, device)
        checkpoints = {}  # checkpoints[start][chunk]: segment ``start``'s input, in host memory
        for start in range(0, len(layers), stride):
            checkpoints[start] = _forward(layers, chunks, start, start + stride)
        labels = [ids[:, 1:][predicting_positions(part)]
                  for ids, part in zip(batch["input_ids"].to(device).split([len(m) for m in masks]), masks)]
        gradients = [_loss_gradient(decoder.norm, model.get_output_embeddings(), chunk.hidden, part, label)
                     for chunk, part, label in zip(chunks, masks, labels)]
        for start in reversed(list(checkpoints)):
            for chunk, hidden in zip(chunks, checkpoints.pop(start)):
                chunk.hidden = hidden.to(device)
            end = min(start + stride, len(layers))
            gradients = _segment_backward(layers, modules, chunks, start, end, gradients, fisher, device)
    return fisher


def _segment_backward(layers: list[nn.Module], modules: list[list[nn.Linear]], chunks: list, start: int, end: int,
                      gradients: list[torch.Tensor], fisher: dict, device) -> list[torch.Tensor]:
    """Layers ``start`` to ``end`` (the chunks hold ``start``'s input): their inputs recomputed, then the
    gradient at ``end``'s input passed back to ``start``'s, their ``modules``' squares added to ``fisher``."""
    # the segment's last layer needs its input, not its output
    kept = {index: _forward(layers, chunks, index, index + 1 if index + 1 < end else index) for index in range(start, end)}
    for index in reversed(range(start, end)):
        with disable_offloading(), _squared_output_gradients(modules[index], fisher):
            gradients = [_input_gradient(layers[index], hidden.to(device), chunk.calls[index], gradient)
                         for hidden, chunk, gradient in zip(kept.pop(index), chunks, gradients)]
    return gradients


@torch.no_grad()
def _forward(layers: list[nn.Module], chunks: list, start: int, end: int) -> list[torch.Tensor]:
    """Layers ``start`` to ``end`` (exclusive) on every chunk, one onloaded at a time; the chunks' inputs
    to layer ``start``, in host memory."""
    inputs = [chunk.hidden.cpu() for chunk in chunks]
    for index in range(start, min(end, len(layers))):
        with disable_offloading():
            run_layer(layers[index], index, chunks, keep=True)
    return inputs


def _loss_gradient(norm: nn.Module, head: nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed next-token cross-entropy with respect to the last layer's output,
    ``head_chunk_tokens`` positions at a time so the logits never exceed one chunk. Only ``hidden`` receives
    a gradient: the head's and the norm's weights get none (the head's would be vocabulary x hidden)."""
    hidden = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        scored = norm(hidden)[:, :-1][predicting_positions(mask)]
        tokens = head_chunk_tokens(head.weight.shape[0])
        parts = list(zip(scored.split(tokens), labels.split(tokens)))
        for number, (part, label) in enumerate(parts):
            head_losses(head, part, label)[0].backward(inputs=[hidden], retain_graph=number < len(parts) - 1)
    return hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)


def _input_gradient(layer: nn.Module, hidden: torch.Tensor, call: tuple, gradient: torch.Tensor) -> torch.Tensor:
    """The layer recomputed from its kept input; the gradient passed from its output to its input."""
    args, kwargs = call
    hidden = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        output = layer_output(layer(hidden, *args, **kwargs))
        (gradient_in,) = torch.autograd.grad(output, hidden, gradient)
    return gradient_in


@contextlib.contextmanager
def _squared_output_gradients(modules: list[nn.Linear], fisher: dict):
    """While open, each of ``modules`` adds its output gradient's squares, summed over tokens, to ``fisher``."""

    def capture(module, _inputs, output):
        if output.requires_grad:
            output.register_hook(partial(_accumulate, fisher[module]))

    handles = [module.register_forward_hook(capture) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _accumulate(total: torch.Tensor, grad: torch.Tensor) -> None:
    """Adds the squares of an output gradient, summed over tokens, to ``total`` (the gradient unchanged)."""
    total.add_(grad.detach().float().square().flatten(0, -2).sum(0).cpu())
