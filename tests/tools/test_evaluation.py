from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from shared_helpers import shared_file

from learned_permutation.tools.data import InputError
from learned_permutation.tools.lm_eval_tasks import run_lm_eval_wikitext
from learned_permutation.tools.lm_eval_tasks.wikitext_local import _is_article_title, wikitext_pages
from learned_permutation.tools.evaluation import (
    check_nm_sparsity,
    kl_divergence,
    kl_divergences,
    layer_reconstruction_errors,
    perplexity,
    text_windows,
    wikitext_eval_text,
    wikitext_rows,
)

TEXT = "The quick brown fox jumps over the lazy dog. " * 7  # 315 bytes: 315 byte-level tokens


def _windows_by_hand(tokenizer, text, seq_len):
    """BOS + consecutive chunks of seq_len - 1 tokens, built with plain list slicing."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = seq_len - 1
    return [[tokenizer.bos_token_id] + ids[i : i + step] for i in range(0, len(ids), step)]


def test_windows_cover_every_token_once_with_a_short_tail(tiny_llama):
    _, tokenizer = tiny_llama
    windows = text_windows(tokenizer, TEXT, seq_len=32)
    assert [w.tolist() for w in windows] == _windows_by_hand(tokenizer, TEXT, 32)
    assert sum(len(w) - 1 for w in windows) == len(TEXT)
    assert len(windows[-1]) < 32
    assert [w.tolist() for w in text_windows(tokenizer, TEXT, 32, max_windows=3)] == _windows_by_hand(tokenizer, TEXT, 32)[:3]


def test_perplexity_matches_a_window_by_window_loss_sum(tiny_llama):
    model, tokenizer = tiny_llama
    result = perplexity(model, tokenizer, TEXT, seq_len=32, batch_size=3)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for window in _windows_by_hand(tokenizer, TEXT, 32):
            ids = torch.tensor([window])
            mean_loss = model(input_ids=ids, labels=ids).loss.item()  # HF shifts labels itself
            total_nll += mean_loss * (len(window) - 1)
            total_tokens += len(window) - 1
    assert result.tokens == total_tokens == len(TEXT)
    assert result.nll == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert perplexity(model, tokenizer, TEXT, seq_len=32, batch_size=1).nll == pytest.approx(result.nll, rel=1e-5)


def _perturbed(model, scale=0.05):
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return noisy


def test_kl_is_zero_for_the_same_model_and_matches_a_direct_computation(tiny_llama):
    model, tokenizer = tiny_llama
    same = kl_divergence(model, model, tokenizer, TEXT, seq_len=40)
    assert same.tokens == len(TEXT)
    assert abs(same.kl) < 1e-7

    noisy = _perturbed(model)
    result = kl_divergence(model, noisy, tokenizer, TEXT, seq_len=40, batch_size=2)
    total, count, per_window = 0.0, 0, []
    with torch.no_grad():
        for window in _windows_by_hand(tokenizer, TEXT, 40):
            ids = torch.tensor([window])
            p = torch.softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            q = torch.softmax(noisy(input_ids=ids).logits[0, :-1].double(), dim=-1)
            total += (p * (p.log() - q.log())).sum().item()
            count += p.shape[0]
            per_window.append((p * (p.log() - q.log())).sum().item() / p.shape[0])
    assert result.kl > 1e-4
    assert result.kl == pytest.approx(total / count, rel=1e-4)
    assert result.window_kl == pytest.approx(per_window, rel=1e-4) and len(set(per_window)) == len(per_window) > 2
    for compared, ppl in ((result.model, perplexity(noisy, tokenizer, TEXT, 40)),
                          (result.reference, perplexity(model, tokenizer, TEXT, 40))):
        assert compared.tokens == ppl.tokens and compared.nll == pytest.approx(ppl.nll, rel=1e-6)


def test_several_models_share_the_reference_pass_and_get_their_own_kl(tiny_llama):
    model, tokenizer = tiny_llama
    models = {"near": _perturbed(model, 0.01), "far": _perturbed(model, 0.1)}
    reference_calls = []
    hook = model.register_forward_hook(lambda *_: reference_calls.append(1))
    together = kl_divergences(model, models, tokenizer, TEXT, seq_len=40, batch_size=2)
    hook.remove()
    assert len(reference_calls) == len(list(_windows_by_hand(tokenizer, TEXT, 40))) // 2 + 1  # once per batch
    for name, alone in ((name, kl_divergence(model, m, tokenizer, TEXT, seq_len=40, batch_size=2))
                        for name, m in models.items()):
        assert together[name] == alone  # the same sums in the same order: equal to every digit
    assert together["near"].kl < together["far"].kl


def test_evaluation_rejects_empty_text_and_tiny_windows(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(InputError, match="empty"):
        perplexity(model, tokenizer, "", seq_len=16)
    with pytest.raises(InputError, match="at least 2"):
        perplexity(model, tokenizer, TEXT, seq_len=1)


def test_wikitext_rows_follow_the_hugging_face_builder(tmp_path):
    path = tmp_path / "wiki.raw"
    path.write_text(" \n = Title = \n \n Some text .\n", encoding="utf-8")
    assert wikitext_rows(path) == ["", " = Title = \n", "", " Some text .\n"]
    assert wikitext_eval_text(path) == "" + "\n\n" + " = Title = \n" + "\n\n" + "" + "\n\n" + " Some text .\n"


def test_wikitext_validation_file_has_the_documented_lines():
    rows = wikitext_rows(shared_file("wikitext2/wiki.valid.raw"))
    assert len(rows) == 3760
    assert rows[1].startswith(" = Homarus gammarus = ")


def _linear_model(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = torch.nn.Module()
    for name, weight in weights.items():
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        model.add_module(name, linear)
    return model


def test_check_nm_sparsity_counts_violating_groups_in_storage_order():
    two_of_four = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0]] * 2)
    broken = two_of_four.clone()
    broken[1, 1] = 5.0  # row 1, first group now holds three non-zeros
    dense = torch.ones(2, 8)
    model = _linear_model({"good": two_of_four, "bad": broken, "lm_head": dense, "odd": torch.zeros(2, 6)})

    report = check_nm_sparsity(model, 2, 4)
    by_name = {module.name: module for module in report.modules}
    assert set(by_name) == {"good", "bad", "odd"}  # lm_head ignored by default
    assert by_name["good"].ok and by_name["good"].groups == 4 and by_name["good"].density == 0.5
    assert not by_name["bad"].ok and by_name["bad"].violating_groups == 1
    assert not by_name["odd"].ok and by_name["odd"].groups == 0  # 6 columns are not groups of 4
    assert {module.name for module in report.failures} == {"bad", "odd"}
    assert not report.ok

    assert check_nm_sparsity(model, 2, 4, ignore=["bad", "odd", "re:.*lm_head"]).ok
    assert not check_nm_sparsity(model, 2, 4, ignore=["bad", "odd"]).ok  # the dense lm_head fails
    # the same columns permuted within groups stay 2:4; a permutation across groups breaks them
    assert check_nm_sparsity(_linear_model({"p": two_of_four[:, [3, 2, 1, 0, 4, 5, 6, 7]]}), 2, 4).ok
    assert not check_nm_sparsity(_linear_model({"p": two_of_four[:, [0, 2, 5, 6, 1, 3, 4, 7]]}), 2, 4).ok


def test_wikitext_pages_cut_the_validation_file_into_its_60_articles():
    raw = shared_file("wikitext2/wiki.valid.raw").read_text(encoding="utf-8")
    pages = wikitext_pages(raw)
    assert len(pages) == 60
    assert all(_is_article_title(page.split("\n", 1)[0]) for page in pages)
    blank_first_line, rest = raw.split("\n", 1)
    assert not blank_first_line.strip()
    assert "\n".join(pages) == rest  # nothing lost but the blank line before the first title


def test_lm_eval_wikitext_task_matches_a_direct_log_likelihood(tiny_llama_dir, tiny_llama, tmp_path):
    """A one-article file shorter than the context is a single lm-eval window: a BOS prefix, then the
    detokenized page encoded with the tokenizer's defaults. lm-eval 0.4.13 thus scores a second BOS
    when the tokenizer prepends one (as Llama's do, and this one): [BOS] + [BOS, page tokens...]."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    model, tokenizer = tiny_llama
    page = " = Tiny = \n \n The fox , the dog and the cat @-@ ish bird sat .\n"
    path = tmp_path / "tiny.raw"
    path.write_text(" \n" + page, encoding="utf-8")

    metrics = run_lm_eval_wikitext(tiny_llama_dir, path, batch_size=1)

    scored = [tokenizer.bos_token_id] + tokenizer(wikitext_detokenizer({"page": page}))["input_ids"]
    assert scored[:2] == [tokenizer.bos_token_id] * 2 and len(scored) < 128
    ids = torch.tensor([scored])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    total_nll = -log_probs.gather(-1, ids[0, 1:, None]).sum().item()
    words, size = len(re.split(r"\s+", page)), len(page.encode())
    assert math.isfinite(metrics["word_perplexity"])
    assert metrics["word_perplexity"] == pytest.approx(math.exp(total_nll / words), rel=1e-4)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(total_nll / size), rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(total_nll / size / math.log(2), rel=1e-4)


def test_layer_reconstruction_errors_measure_each_linear_on_reference_inputs(tiny_llama):
    model, tokenizer = tiny_llama
    compared = copy.deepcopy(model)
    with torch.no_grad():
        compared.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # error (1 - 0.5)^2 = 0.25 of the energy
        compared.model.layers[1].self_attn.o_proj.weight.zero_()  # everything lost: 1.0
    text = "Once upon a time there was a tiny test model that read a short story. " * 4
    errors = layer_reconstruction_errors(model, compared, tokenizer, text, seq_len=32, batch_size=2)
    assert len(errors) == 7 * model.config.num_hidden_layers  # every Linear but lm_head
    assert errors.pop("model.layers.0.mlp.down_proj") == pytest.approx(0.25, rel=1e-5)
    assert errors.pop("model.layers.1.self_attn.o_proj") == pytest.approx(1.0, rel=1e-6)
    assert all(value == 0.0 for value in errors.values())
