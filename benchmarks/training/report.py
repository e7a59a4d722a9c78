"""Model cards and the `results/models.md` table, written from each model's measured ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

EVAL_PROTOCOL = (
    "Perplexity is token-level with each model's own tokenizer, computed by the project's "
    "`learned_permutation.tools.evaluation.perplexity` (non-overlapping `[BOS] + (seq_len - 1 tokens)` "
    "windows, every text token predicted once; see that module). Validation text: the held-out books joined "
    "by the corpus separator line, first `--val-max-windows` windows; WikiText-2: `wikitext_eval_text` of "
    "`wiki.valid.raw`, all windows. The numbers come from the checkpoint as stored (weights rounded to "
    "`save_dtype`), computed in float32. Unigram: add-one-smoothed training token frequencies on the same "
    "validation targets."
)


def _shape_text(m: dict) -> str:
    s = m["shape"]
    heads = f"{s['num_attention_heads']}q/{s['num_key_value_heads']}kv heads"
    tied = "tied" if s["tie_word_embeddings"] else "untied"
    return (f"d={s['hidden_size']}, ffn={s['intermediate_size']}, L={s['num_hidden_layers']}, {heads} "
            f"(head_dim {s['hidden_size'] // s['num_attention_heads']}), vocab {m['vocab_size']}, {tied}")


def model_card(m: dict) -> str:
    """README.md of one checkpoint: what it is, how it was trained, what it scores, how to regenerate it."""
    t = m["train_config"]
    status = "ran to completion" if m["finished"] else (
        f"stopped early by {m['stop_reason']}: the learning rate had not finished its decay")
    samples = "\n\n".join(f"```text\n{text}\n```" for text in m["samples"])
    return f"""# {m['name']}

A small Llama (`LlamaForCausalLM`) trained from scratch on the English Project Gutenberg corpus
(`shared/data/corpus`, public domain) as a test subject for N:M pruning with learned permutations.
It is not converged and not meant for anything but benchmarks.

* Parameters: {m['parameters']:,} ({_shape_text(m)})
* Sequence length: {t['seq_len']} (`max_position_embeddings`); RoPE, RMSNorm, SwiGLU as in `LlamaConfig` defaults.
* Tokenizer: byte-level BPE trained on the training books (every byte is a symbol, so no text is unknown);
  BOS `{m['special_tokens']['bos']}` is prepended, EOS `{m['special_tokens']['eos']}` ends each book,
  PAD `{m['special_tokens']['pad']}`. Loads with `AutoTokenizer.from_pretrained(<this dir>)`.
* Weights are stored as **{m['save_dtype']}** safetensors to keep the file small. transformers 5 loads them in
  that dtype by default; pass `dtype=torch.float32` to compute in float32 (as the numbers below were).
* Training: {m['steps_done']} of {t['max_steps']} steps ({status}), batch {t['batch_size']} x {t['seq_len']}
  tokens = {m['tokens_seen']:,} tokens, AdamW (0.9, 0.95, weight decay {t['weight_decay']} on matrices),
  peak LR {t['learning_rate']} with {t['warmup_steps']} warmup steps then cosine to {t['final_lr_fraction']} x peak,
  grad clip {t['grad_clip']}, seed {t['seed']}, fp32 on {m['device']} ({m['threads']} CPU threads): {m['train_minutes']:.1f} min.
* Validation: {m['val_books']} whole books held out of the corpus (never seen by the tokenizer or the model).

| metric | value |
|---|---|
| validation perplexity | {m['val']['perplexity']:.2f} ({m['val']['scored_tokens']:,} tokens) |
| unigram validation perplexity | {m['unigram_val_perplexity']:.1f} |
| WikiText-2 validation perplexity | {m['wikitext2']['perplexity']:.2f} ({m['wikitext2']['scored_tokens']:,} tokens) |

{EVAL_PROTOCOL}

## Samples (top-p 0.9, temperature 0.8, seed {t['seed']})

{samples}

## Regenerate

```bash
{m['command']}
```

Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.
"""


def results_table(metrics: list[dict]) -> str:
    """`results/models.md`: one row per trained model plus the command that produced it."""
    rows = "\n".join(
        f"| `{m['name']}` | {m['parameters'] / 1e6:.2f}M | {_shape_text(m)} | {m['tokens_seen'] / 1e6:.2f}M "
        f"({m['steps_done']}/{m['train_config']['max_steps']} steps) | {m['train_minutes']:.1f} | "
        f"{m['val']['perplexity']:.2f} | {m['unigram_val_perplexity']:.1f} | {m['wikitext2']['perplexity']:.2f} |"
        for m in metrics
    )
    commands = "\n".join(f"# {m['name']}\n{m['command']}" for m in metrics)
    return f"""# Benchmark models: validation perplexity

Written by `benchmarks/train_models.py` from each model's `metrics.json`; do not edit by hand.

| model | params | shape | tokens seen | train min | val ppl | unigram val ppl | WikiText-2 val ppl |
|---|---|---|---|---|---|---|---|
{rows}

{EVAL_PROTOCOL} Training time is wall time of the training loop on the machine it ran on
(shared CPU, `torch.set_num_threads` as recorded in each model card).

Commands (from the repository root):

```bash
{commands}
```
"""


def write_results(models_dir: Path, results_path: Path) -> None:
    """Rebuild the results table from every ``models_dir/*/metrics.json``."""
    metrics = [json.loads(p.read_text()) for p in sorted(Path(models_dir).glob("*/metrics.json"))]
    metrics.sort(key=lambda m: m["parameters"])
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(results_table(metrics))
