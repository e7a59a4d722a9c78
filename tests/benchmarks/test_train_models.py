"""Smoke test of `benchmarks/train_models.py` on a tiny slice of the shared corpus, plus its schedule and split."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import train_models  # noqa: E402
from training.corpus import split_books  # noqa: E402
from training.loop import TrainConfig, learning_rate  # noqa: E402

from learned_permutation.tools.data import shared_data_dir  # noqa: E402

SHARED_DATA = shared_data_dir()


def test_learning_rate_warms_up_then_decays_to_floor():
    cfg = TrainConfig(max_steps=100, batch_size=1, seq_len=8, learning_rate=1.0, warmup_steps=10, seed=0)
    rates = [learning_rate(s, cfg) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert learning_rate(100, cfg) == pytest.approx(cfg.final_lr_fraction)


def test_split_books_holds_out_whole_books_spread_over_the_corpus():
    books = [f"book {i}\n" for i in range(10)]
    train, val = split_books(books, 2)
    assert val == ["book 2\n", "book 7\n"] and len(train) == 8 and not set(train) & set(val)
    with pytest.raises(ValueError, match="--val-books"):
        split_books(books, 10)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Four 'books' of 30k characters from the real corpus and 20k characters of WikiText-2."""
    source = SHARED_DATA / "corpus" / "gutenberg_en_part1.txt"
    if not source.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("data")
    text = source.read_text(encoding="utf-8")[:120_000]
    (root / "corpus").mkdir()
    books = [text[i : i + 30_000] for i in range(0, 120_000, 30_000)]
    (root / "corpus" / "part.txt").write_text("\n<|endoftext|>\n".join(books), encoding="utf-8")
    wiki = (SHARED_DATA / "wikitext2" / "wiki.valid.raw").read_text(encoding="utf-8")[:20_000]
    (root / "wiki.valid.raw").write_text(wiki, encoding="utf-8")
    return root


def run(data: Path, out: Path, *extra: str) -> None:
    argv = ["--preset", "tiny", "--vocab-size", "300", "--val-books", "1", "--seq-len", "64",
            "--corpus-dir", str(data / "corpus"), "--wikitext", str(data / "wiki.valid.raw"),
            "--work-dir", str(out / "work"), "--output-dir", str(out / "models"),
            "--results-md", str(out / "models.md"), "--eval-every", "4", "--threads", "1", "--val-max-windows", "8", "--wikitext-max-windows", "8", *extra]
    assert train_models.main(argv) == 0


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run(tiny_data, out)
    return out


def test_checkpoint_loads_offline_with_special_tokens(trained):
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaForCausalLM

    directory = trained / "models" / "tiny-gutenberg"
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    text = "Whither, O  stranger?\n\n\tcafé"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    with safe_open(directory / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_training_learns_and_reports(trained):
    metrics = json.loads((trained / "models" / "tiny-gutenberg" / "metrics.json").read_text())
    assert metrics["finished"] and metrics["steps_done"] == 8
    assert metrics["history"][-1]["val_loss"] < math.log(metrics["vocab_size"])
    assert 1 < metrics["val"]["perplexity"] < metrics["vocab_size"]
    assert 1 < metrics["wikitext2"]["perplexity"] < float("inf")
    table = (trained / "models.md").read_text()
    assert "`tiny-gutenberg`" in table and f"{metrics['val']['perplexity']:.2f}" in table
    assert "--preset tiny" in (trained / "models" / "tiny-gutenberg" / "README.md").read_text()


def test_paused_and_resumed_run_matches_uninterrupted_run(tiny_data, trained):
    from safetensors.torch import load_file

    out = trained / "resumed"
    run(tiny_data, out, "--stop-at-step", "4")
    stopped = json.loads((out / "models" / "tiny-gutenberg" / "metrics.json").read_text())
    assert (stopped["steps_done"], stopped["finished"], stopped["stop_reason"]) == (4, False, "stop_at_step")
    with pytest.raises(ValueError, match="past --stop-at-step"):
        run(tiny_data, out, "--stop-at-step", "3")
    run(tiny_data, out)
    resumed = load_file(out / "models" / "tiny-gutenberg" / "model.safetensors")
    straight = load_file(trained / "models" / "tiny-gutenberg" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_reevaluate_remeasures_without_training(tiny_data, trained):
    path = trained / "models" / "tiny-gutenberg" / "metrics.json"
    measured = json.loads(path.read_text())
    weights = (trained / "models" / "tiny-gutenberg" / "model.safetensors").read_bytes()
    path.write_text(json.dumps({**measured, "val": {**measured["val"], "perplexity": -1.0}}))
    run(tiny_data, trained, "--reevaluate")
    again = json.loads(path.read_text())
    assert again["val"] == measured["val"] and again["history"] == measured["history"]
    assert (trained / "models" / "tiny-gutenberg" / "model.safetensors").read_bytes() == weights
    assert "-1.00" not in (trained / "models.md").read_text()
