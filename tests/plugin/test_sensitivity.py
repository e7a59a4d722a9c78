"""Per-row loss sensitivity of the residual readers: the layer-by-layer sweep against whole-model autograd."""

from __future__ import annotations

import torch

from learned_permutation.plugin.residual_sample import ReaderRowSample
from learned_permutation.plugin.sensitivity import output_row_fisher
from tiny_models import build_tiny_model


def test_layer_sweep_gives_whole_model_squared_output_gradients():
    """Summed squared gradients of the cross-entropy at each output row, as one autograd pass through the
    whole model gives them, padded positions and the last position of each row excluded from the loss."""
    model = build_tiny_model("llama").float().eval()
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    modules = [[layer.self_attn.k_proj, layer.mlp.up_proj] for layer in model.model.layers]
    fisher = output_row_fisher(model, {"input_ids": ids, "attention_mask": mask}, modules, "cpu")

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
