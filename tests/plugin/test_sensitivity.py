"""Per-row loss sensitivity of the residual readers: the layer-by-layer sweep against whole-model autograd."""

from __future__ import annotations

import weakref

import pytest
import torch

from learned_permutation.plugin.residual_sample import ReaderRowSample
from learned_permutation.plugin import sensitivity
from learned_permutation.plugin.sensitivity import checkpoint_stride, output_row_fisher
from tiny_models import TINY_CONFIGS, random_model


def deep_tiny_llama(layers: int) -> torch.nn.Module:
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = layers
    return random_model(config)


@pytest.mark.parametrize("layers", [2, 5])  # one segment; segments of 3 and 2 layers
def test_layer_sweep_gives_whole_model_squared_output_gradients(layers):
    """Summed squared gradients of the cross-entropy at each output row, as one autograd pass through the
    whole model gives them, padded positions and the last position of each row excluded from the loss."""
    model = deep_tiny_llama(layers)
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    modules = [[layer.self_attn.k_proj, layer.mlp.up_proj] for layer in model.model.layers]
    fisher = output_row_fisher(model, {"input_ids": ids, "attention_mask": mask}, modules, "cpu")
    assert all(parameter.grad is None for parameter in model.parameters())  # no vocabulary x hidden gradient left

    expected = {module: torch.zeros(module.out_features) for inside in modules for module in inside}

    def accumulate(module, _grad_input, grad_output):
        expected[module].add_(grad_output[0].square().flatten(0, -2).sum(0))

    handles = [module.register_full_backward_hook(accumulate) for module in expected]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    scored = (mask[:, 1:] * mask[:, :-1]).bool()
    torch.nn.functional.cross_entropy(logits[scored], ids[:, 1:][scored], reduction="sum").backward()
    for handle in handles:
        handle.remove()
    for module, value in expected.items():
        assert value.sum() > 0
        torch.testing.assert_close(fisher[module], value, rtol=1e-4, atol=1e-10)


def test_weighted_reader_sample_keeps_the_heaviest_rows_scaled_by_their_sensitivity():
    hidden, layers = 8, 2
    weights = [torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))
               for seed, rows in enumerate((6, 10, 6, 10))]
    sensitivities = [torch.rand(len(w), generator=torch.Generator().manual_seed(seed + 10)) for seed, w in enumerate(weights)]
    sensitivities[0][:] = 100.0  # the first reader's rows outweigh all others
    act_sq = torch.ones(hidden)
    sample = ReaderRowSample(layers, sum(len(w) for w in weights), seed=0)
    for weight, sensitivity in zip(weights, sensitivities):
        sample.add(weight, act_sq, sensitivity)
    scaled = torch.cat([w * s.sqrt()[:, None] for w, s in zip(weights, sensitivities)])
    heaviest = scaled[scaled.square().sum(1).topk(sample.capacity).indices]
    kept = torch.cat([consumer.weight for consumer in sample.consumers])
    assert sample.sampled_rows == sample.capacity == 16
    assert sorted(kept.square().sum(1).tolist()) == sorted(heaviest.square().sum(1).tolist())
    assert torch.equal(sample.consumers[0].weight, weights[0] * 10.0)


def test_layer_sweep_keeps_about_twice_the_square_root_of_the_depth_in_layer_inputs(monkeypatch):
    """Nine layers: segments of three, so at most three checkpoints and one segment's three inputs wait at
    once (the forward keeping every layer's input would hold nine)."""
    model = deep_tiny_llama(9)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    live, peak, original = [0], [0], sensitivity._forward

    def counting(*args):
        inputs = original(*args)
        for hidden in inputs[:1]:  # one chunk's tensor stands for its layer's inputs
            live[0] += 1
            weakref.finalize(hidden, lambda: live.__setitem__(0, live[0] - 1))
        peak[0] = max(peak[0], live[0])
        return inputs

    monkeypatch.setattr(sensitivity, "_forward", counting)
    modules = [[layer.mlp.up_proj] for layer in model.model.layers]
    fisher = output_row_fisher(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, modules, "cpu")
    assert checkpoint_stride(9) == 3 and 0 < peak[0] <= 6
    assert all(value.sum() > 0 for value in fisher.values())
