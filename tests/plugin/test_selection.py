"""The residual site's end-to-end candidate ranking: its losses (cross-entropy, KL to the dense model)
are those of the model that folding the candidate and pruning would produce."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from compressed_tensors.offload import set_onload_device
from compressed_tensors.offload.cache import CPUCache, OffloadCache
from transformers import Qwen2Config

from learned_permutation.plugin import selection
from learned_permutation.plugin.selection import (
    SimulatedPruning,
    calibration_sample,
    predicting_positions,
    scored_final_hidden,
    leading_rows,
    prediction_losses,
)
from learned_permutation.plugin.pruner_model import PrunerModel
from learned_permutation.plugin.statistics import InputStatistics
from learned_permutation.structure import find_sites, fold_permutation
from learned_permutation.structure.offload import stored_tensor
from tiny_models import TINY_CONFIGS, TINY_SHAPE, build_tiny_model, random_model, save_tiny_model

N, M = 2, 4
WANDA = PrunerModel("wanda", N, M)


def batches(vocab: int, seed: int = 0, count: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, 2, 20), generator=generator)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]


def targeted_linears(model) -> list[torch.nn.Linear]:
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]


def input_energy(model, data) -> dict:
    stats = InputStatistics(full=False)
    handles = [m.register_forward_hook(stats.hook) for m in targeted_linears(model)]
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for handle in handles:
        handle.remove()
    return stats.pop(targeted_linears(model))


def wanda_prune_in_storage_order(model, act_sq: dict) -> None:
    """Wanda's N:M mask computed directly, group by group, on the stored weights."""
    with torch.no_grad():
        for module in targeted_linears(model):
            score = module.weight.abs() * act_sq[module].sqrt()
            groups = score.reshape(score.shape[0], -1, M)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(N, dim=-1).indices, True)
            module.weight.mul_(keep.reshape(score.shape))


def wanda_prune_sequentially(model, data) -> None:
    """Wanda's masks layer by layer, each layer's from its inputs in the model whose earlier layers are
    already pruned (what llm-compressor's sequential pipeline gives the pruner)."""
    for layer in model.model.layers:
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        stats = InputStatistics(full=False)
        handles = [m.register_forward_hook(stats.hook) for m in linears]
        with torch.no_grad():
            for batch in data:
                model(**batch)
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for module in linears:
                score = module.weight.abs() * stats.sums[module].sqrt()
                groups = score.reshape(score.shape[0], -1, M)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(N, dim=-1).indices, True)
                module.weight.mul_(keep.reshape(score.shape))


def cross_entropy(model, data: list[dict]) -> float:
    """Mean next-token cross-entropy over equally sized batches."""
    return sum(prediction_losses(model, batch)["ce"] for batch in data) / len(data)


def dense_positions(model, batch: dict) -> torch.Tensor:
    return scored_final_hidden(model, batch, "cpu")


def padded_rows(vocab: int, rows: int, length: int) -> dict:
    """``rows`` random rows, every other one right-padded by a few tokens."""
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# Qwen2 with a sliding window on layer 1 only: the two layers get different attention masks.
MIXED_ATTENTION = lambda: Qwen2Config(**TINY_SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=1)  # noqa: E731


@pytest.mark.parametrize("kind", [*TINY_CONFIGS, "qwen2_mixed_attention"])
def test_layer_by_layer_chunks_compute_the_decoders_own_hidden_states(kind, monkeypatch):
    model = random_model(MIXED_ATTENTION()) if kind == "qwen2_mixed_attention" else build_tiny_model(kind)
    batch = padded_rows(model.config.vocab_size, rows=5, length=20)
    monkeypatch.setattr(selection, "LAYER_CHUNK_TOKENS", 40)  # two rows per layer call
    with torch.no_grad():
        expected = model.get_decoder()(**batch).last_hidden_state
    found = scored_final_hidden(model, batch, "cpu")
    scored = expected[:, :-1][predicting_positions(batch["attention_mask"])]
    torch.testing.assert_close(found, scored, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scored_final_hidden(model, batch, "cpu", leading_positions=45), found[:45])


def test_each_layer_runs_on_one_chunk_at_a_time_and_finishes_before_the_next(monkeypatch):
    model = build_tiny_model("llama")
    batch = padded_rows(model.config.vocab_size, rows=6, length=20)
    monkeypatch.setattr(selection, "LAYER_CHUNK_TOKENS", 40)
    events = []
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda _m, args, _o, index=index: events.append((index, args[0].shape[:-1].numel())))
    scored_final_hidden(model, batch, "cpu", after_layer=lambda index: events.append((index, "done")))
    assert events == [(0, 40)] * 3 + [(0, "done")] + [(1, 40)] * 3 + [(1, "done")]


def test_an_offloaded_layer_is_onloaded_once_per_pass_and_released_after(monkeypatch):
    """As llm-compressor's sequential pipeline keeps a subgraph onloaded for all its batches: onloading
    per chunk would copy every layer's weights to the accelerator once per chunk. The solves that follow
    a layer (``after_layer``) hold no onloaded layer: their own copies are extra memory enough."""
    model = build_tiny_model("llama")
    batch = padded_rows(model.config.vocab_size, rows=6, length=20)
    monkeypatch.setattr(selection, "LAYER_CHUNK_TOKENS", 40)  # three chunks
    set_onload_device(model, torch.device("cpu"))
    onloads, onload = Counter(), CPUCache.onload
    monkeypatch.setattr(CPUCache, "onload", lambda cache, value: onloads.update([id(value)]) or onload(cache, value))
    held_after_layer = []
    scored_final_hidden(model, batch, "cpu", after_layer=lambda _: held_after_layer.append(len(OffloadCache.keep_onloaded_values)))
    weights = [id(stored_tensor(layer.mlp.down_proj, "weight")) for layer in model.model.layers]
    assert [onloads[weight] for weight in weights] == [1, 1]
    assert held_after_layer == [0, 0] and not OffloadCache.keep_onloaded_values


def test_logits_are_computed_a_bounded_number_of_elements_at_a_time(monkeypatch):
    """1,024 tokens of a 128k vocabulary would be 512 MiB per logits tensor: chunks are sized by the vocabulary."""
    model = build_tiny_model("llama")
    head, vocab = model.get_output_embeddings(), model.config.vocab_size
    hidden, dense = torch.randn(10, model.config.hidden_size), torch.randn(10, model.config.hidden_size)
    labels = torch.randint(0, vocab, (10,))
    whole = selection.head_losses(head, hidden, labels, dense)
    monkeypatch.setattr(selection, "HEAD_CHUNK_ELEMENTS", 3 * vocab)
    rows, linear = [], selection.F.linear
    monkeypatch.setattr(selection.F, "linear", lambda x, *args: rows.append(x.shape[0]) or linear(x, *args))
    chunked = selection.head_losses(head, hidden, labels, dense)
    assert max(rows) == 3 and sum(rows) == 20
    for found, expected in zip(chunked, whole):
        torch.testing.assert_close(found, expected)


def test_cross_entropy_is_the_models_own_loss():
    model = build_tiny_model("llama")
    data = batches(model.config.vocab_size)
    with torch.no_grad():
        expected = sum(float(model(**b, labels=b["input_ids"]).loss) for b in data) / len(data)
    assert cross_entropy(model, data) == pytest.approx(expected, rel=1e-5)


def test_kl_is_the_divergence_of_the_full_predictions_from_the_dense_models():
    model = build_tiny_model("llama")
    batch = batches(model.config.vocab_size)[0]
    dense = dense_positions(model, batch)
    assert prediction_losses(model, batch, dense)["kl"] == pytest.approx(0.0, abs=1e-6)
    pruned = copy.deepcopy(model)
    wanda_prune_in_storage_order(pruned, input_energy(pruned, [batch]))
    with torch.no_grad():
        reference = model(**batch).logits[:, :-1].log_softmax(-1).flatten(0, 1)
        found = pruned(**batch).logits[:, :-1].log_softmax(-1).flatten(0, 1)
    expected = float((reference.exp() * (reference - found)).sum(-1).mean())
    assert prediction_losses(pruned, batch, dense)["kl"] == pytest.approx(expected, rel=1e-4)
    assert expected > 0


def test_losses_ignore_padding():
    model = build_tiny_model("llama")
    ids = batches(model.config.vocab_size, count=1)[0]["input_ids"][:1]
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=ids.dtype)], dim=1)
    padded_batch = {"input_ids": padded, "attention_mask": mask}
    plain_batch = {"input_ids": ids}
    pruned = copy.deepcopy(model)
    wanda_prune_in_storage_order(pruned, input_energy(pruned, [plain_batch]))
    with_padding = prediction_losses(pruned, padded_batch, dense_positions(model, padded_batch))
    without = prediction_losses(pruned, plain_batch, dense_positions(model, {**plain_batch, "attention_mask": torch.ones_like(ids)}))
    assert with_padding["ce"] == pytest.approx(without["ce"], rel=1e-5)
    assert with_padding["kl"] == pytest.approx(without["kl"], rel=1e-4)


def test_calibration_sample_is_bounded_order_free_and_loss_preserving():
    model = build_tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (5, 20), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[i : i + 1, : 8 + 3 * i]} for i in range(5)]
    whole = calibration_sample(rows, tokens=1000)
    assert int(whole["attention_mask"].sum()) == sum(8 + 3 * i for i in range(5))
    per_row = sum(prediction_losses(model, row)["ce"] * (row["input_ids"].shape[1] - 1) for row in rows)
    assert prediction_losses(model, whole)["ce"] == pytest.approx(per_row / (int(whole["attention_mask"].sum()) - 5), rel=1e-5)
    shuffled = calibration_sample(rows[::-1], tokens=30)
    assert torch.equal(shuffled["input_ids"], calibration_sample(rows, tokens=30)["input_ids"])
    assert int(shuffled["attention_mask"].sum()) == 30


def test_losses_reject_data_without_token_pairs():
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="no pair of consecutive tokens"):
        prediction_losses(model, {"input_ids": torch.tensor([[5]])})


def random_site_permutation(site, seed):
    """A random permutation of ``site`` that keeps every channel in its block (attn_vo: its head)."""
    generator = torch.Generator().manual_seed(seed)
    block = site.block_size or site.size
    return torch.cat([start + torch.randperm(block, generator=generator) for start in range(0, site.size, block)])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("kinds", [("residual",), ("residual", "mlp", "attn_vo")])
def test_simulated_loss_is_the_loss_of_the_folded_pruned_model(kind, kinds):
    """A configuration (one permutation per site) simulated in the stored order computes what the model
    folded with it and pruned in storage order computes; the per-layer sites' consumers included."""
    model = build_tiny_model(kind)
    data = batches(model.config.vocab_size)
    act_sq = input_energy(model, data)
    sites = find_sites(model, M, kinds=kinds)
    perms = [random_site_permutation(site, 3 + index) for index, site in enumerate(sites)]
    orders = {named.module: site.consumer_column_index(perm) for site, perm in zip(sites, perms)
              for named in site.consumer_modules if named.module in act_sq}
    batch = data[0]
    dense = dense_positions(model, batch)
    dense_loss = prediction_losses(model, batch)["ce"]

    simulated = SimulatedPruning(list(act_sq), WANDA).losses(model, batch, dense, orders)

    folded = copy.deepcopy(model)
    for site, perm in zip(find_sites(folded, M, kinds=kinds), perms):
        fold_permutation(folded, site, perm)
    folded_dense = dense_positions(folded, batch)  # its hidden states live in the permuted basis
    wanda_prune_sequentially(folded, [batch])
    assert simulated["ce"] == pytest.approx(prediction_losses(folded, batch)["ce"], rel=1e-4)
    assert simulated["kl"] == pytest.approx(prediction_losses(folded, batch, folded_dense)["kl"], rel=1e-4)
    assert simulated["ce"] > dense_loss and simulated["kl"] > 0
    assert prediction_losses(model, batch)["ce"] == dense_loss  # the Linears compute densely again


def test_simulated_loss_depends_on_the_permutation():
    model = build_tiny_model("llama")
    data = batches(model.config.vocab_size)
    act_sq = input_energy(model, data)
    residual = find_sites(model, M, kinds=("residual",))[0]
    readers = [named.module for named in residual.consumer_modules if named.module in act_sq]
    simulation = SimulatedPruning(list(act_sq), WANDA)
    dense = dense_positions(model, data[0])
    identity = simulation.losses(model, data[0], dense, {})
    shuffled = simulation.losses(model, data[0], dense, dict.fromkeys(readers, torch.randperm(residual.size)))
    assert identity["kl"] != pytest.approx(shuffled["kl"], rel=1e-6)


def test_leading_rows_are_whole_rows_within_the_budget_and_own_the_first_scored_positions():
    model = build_tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (6, 20), generator=torch.Generator().manual_seed(1))
    sample = calibration_sample([{"input_ids": ids[i : i + 1, : 10 + 2 * i]} for i in range(6)], tokens=1000)
    part, scored = leading_rows(sample, tokens=40)
    lengths = sample["attention_mask"].sum(dim=1)
    assert int(part["attention_mask"].sum()) <= 40 < int(lengths[: len(part["input_ids"]) + 1].sum())
    dense = dense_positions(model, sample)
    assert torch.allclose(dense[:scored], dense_positions(model, part), atol=1e-5)
    assert leading_rows(sample, tokens=1)[0]["input_ids"].shape[0] == 1  # never empty


def test_simulated_linears_compute_only_their_pruned_product(monkeypatch):
    """A simulated Linear's own forward never runs in a scoring pass (the simulation computes the dense
    product of the layer's calibration pass and the pruned one itself, not a third on top), and the
    class's forward is back afterwards."""
    model = build_tiny_model("llama")
    data = batches(model.config.vocab_size)
    act_sq = input_energy(model, data)
    simulation = SimulatedPruning(list(act_sq), WANDA)
    dense = dense_positions(model, data[0])
    calls = []
    original = torch.nn.Linear.forward

    def counting(self, inputs):
        calls.append(self)
        return original(self, inputs)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    simulation.losses(model, data[0], dense, {})
    assert not set(calls) & set(act_sq)
    assert all("forward" not in module.__dict__ for module in act_sq)
    prediction_losses(model, data[0])
    assert set(act_sq) <= set(calls)


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_sequential_simulation_is_llm_compressors_own_pruning(pruner, tmp_path):
    """Each layer is pruned from statistics taken on the already pruned layers' outputs, as
    llm-compressor's sequential pipeline (``propagate_error``) gives the pruner, and with SparseGPT by
    SparseGPT's own update: the simulated KL is the real pruned model's. Wanda masks from the dense
    model's statistics, or SparseGPT's mask without its update, give another one."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    model_dir = save_tiny_model("llama", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense = dense_positions(model, batch)
    recipe = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[pruner](
        sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
    simulated_pruner = PrunerModel.following(recipe, pruner, N, M)
    simulated = SimulatedPruning(targeted_linears(model), simulated_pruner).losses(model, batch, dense, {})
    if pruner == "wanda":
        other = copy.deepcopy(model)
        wanda_prune_in_storage_order(other, input_energy(other, [batch]))
        other_kl = prediction_losses(other, batch, dense)["kl"]
    else:
        other_kl = SimulatedPruning(targeted_linears(model), PrunerModel(pruner, N, M)).losses(model, batch, dense, {})["kl"]

    pruned = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    oneshot(model=pruned, tokenizer=AutoTokenizer.from_pretrained(model_dir), recipe=recipe,
            dataset=Dataset.from_dict({k: v.tolist() for k, v in batch.items()}), num_calibration_samples=4,
            max_seq_length=32, pipeline="sequential", shuffle_calibration_samples=False)
    real = prediction_losses(pruned, batch, dense)["kl"]
    assert simulated["kl"] == pytest.approx(real, rel=1e-4)
    assert abs(other_kl - real) > 100 * abs(simulated["kl"] - real)


def test_each_linears_mask_is_computed_once_per_pass_whatever_the_chunks(monkeypatch):
    """A layer's row chunks reuse its Linears' masks (the statistics are final after its calibration
    pass): one mask per simulated Linear per pass, and the losses of one chunk of the whole sample."""
    model = build_tiny_model("llama")
    batch = {key: torch.cat([b[key] for b in batches(model.config.vocab_size)]) for key in ("input_ids", "attention_mask")}
    linears = targeted_linears(model)
    dense = dense_positions(model, batch)
    whole = SimulatedPruning(linears, WANDA).losses(model, batch, dense, {})
    computed = Counter()
    original = SimulatedPruning._kept

    def counting(self, weight, energy, order):
        computed[next(m for m in linears if m.weight is weight)] += 1
        return original(self, weight, energy, order)

    monkeypatch.setattr(SimulatedPruning, "_kept", counting)
    monkeypatch.setattr(selection, "LAYER_CHUNK_TOKENS", 20)  # one row per chunk: six chunks
    chunked = SimulatedPruning(linears, WANDA).losses(model, batch, dense, {})
    assert computed == Counter(linears)
    assert chunked["kl"] == pytest.approx(whole["kl"], rel=1e-5)
