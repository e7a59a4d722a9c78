"""Evaluation helpers the project's `learned_permutation.tools.evaluation` does not have: the training
loop's validation windows, a unigram baseline, and text samples."""

from __future__ import annotations

import math

import torch


def windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows from the start of a token stream; the short tail is dropped."""
    count = len(tokens) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"stream of {len(tokens)} tokens is shorter than one window of {seq_len}")
    return tokens[: count * seq_len].view(count, seq_len)


def unigram_perplexity(train_tokens: torch.Tensor, eval_windows: list[torch.Tensor], vocab_size: int) -> float:
    """Perplexity of add-one-smoothed training token frequencies on every window's tokens after the first
    (the targets the project's `perplexity` scores)."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    targets = torch.cat([window[1:] for window in eval_windows])
    return math.exp(-log_probs[targets].mean().item())


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], seed: int, max_new_tokens: int = 60) -> list[str]:
    """Nucleus samples (top-p 0.9, temperature 0.8) continuing each prompt; fixed by ``seed``."""
    model.eval()
    texts = []
    for prompt in prompts:
        torch.manual_seed(seed)
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        output = model.generate(**inputs, do_sample=True, top_p=0.9, temperature=0.8,
                                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return texts
