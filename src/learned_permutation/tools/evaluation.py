"""Offline evaluation: perplexity, KL divergence to a reference model, WikiText-2, N:M checks.

Windowing, shared by `perplexity` and `kl_divergence`: the text is tokenised once without special
tokens and cut into consecutive, non-overlapping chunks of ``seq_len - 1`` tokens. Every window is
``[BOS] + chunk``, so every text token is predicted exactly once (the first token of a window from
BOS alone, the others from the BOS and the window's earlier tokens; no context crosses windows). The
tail chunk, shorter than the others, is evaluated too, in its own batch. Predicted positions are
therefore exactly the text's tokens, and ``tokens`` in the results counts them. ``max_windows``
keeps only the first windows (a quick estimate on a long text, like lm-eval's ``--limit``).

Memory: one batch of float32 log-probabilities, ``batch_size * seq_len * vocab * 4`` bytes (twice that
for KL); lower ``batch_size`` for large vocabularies.

This differs from the GPTQ/SparseGPT/Wanda script (windows of ``seq_len`` tokens with one BOS at the
start of the whole text, the first token of every window unscored and the tail dropped): that
script's numbers are comparable to each other, ours to ours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from compressed_tensors.utils import match_named_modules

from learned_permutation.tools.data import InputError


@dataclass(frozen=True)
class PerplexityResult:
    """``nll`` is the mean negative log-likelihood per predicted token in nats; ``ppl = exp(nll)``."""

    tokens: int
    nll: float
    ppl: float


@dataclass(frozen=True)
class KLResult:
    """``kl`` is the mean over predicted token positions of KL(reference || model), in nats; ``model``
    and ``reference`` are both models' perplexities on the same tokens, which the same passes give;
    ``window_kl`` the mean per window, in window order (two models' windows pair up: the evaluation's own
    noise in their difference)."""

    tokens: int
    kl: float
    model: PerplexityResult
    reference: PerplexityResult
    window_kl: list[float] = field(default_factory=list)


def _perplexity_result(total_nll: float, tokens: int) -> PerplexityResult:
    return PerplexityResult(tokens=tokens, nll=total_nll / tokens, ppl=math.exp(total_nll / tokens))


def _target_nll(log_probs: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Summed negative log-likelihood of each window's tokens after the first."""
    targets = input_ids[:, 1:].to(log_probs.device)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()


def text_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """The ``[BOS] + chunk`` windows described in the module docstring, as 1-D LongTensors."""
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2 (BOS plus one token), got {seq_len}")
    if tokenizer.bos_token_id is None:
        raise InputError("evaluation windows start with BOS, but the tokenizer defines no BOS token")
    # verbose=False: a text longer than the model's context is expected here; windows cut it
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() == 0:
        raise InputError("evaluation text is empty: it tokenises to no tokens")
    bos = torch.tensor([tokenizer.bos_token_id])
    if max_windows is not None and max_windows < 1:
        raise InputError(f"max_windows must be at least 1, got {max_windows}")
    chunks = ids.split(seq_len - 1)[:max_windows]
    return [torch.cat([bos, chunk]) for chunk in chunks]


def _batches(windows: list[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack windows of equal length into batches (all but the tail window are full length)."""
    full, tail = windows[:-1], windows[-1]
    if tail.numel() == windows[0].numel():
        full, tail = windows, None
    for start in range(0, len(full), batch_size):
        yield torch.stack(full[start : start + batch_size])
    if tail is not None:
        yield tail.unsqueeze(0)


def _next_token_log_probs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities ``[batch, len - 1, vocab]`` of each window's next tokens."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits[:, :-1, :]
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, seq_len: int, batch_size: int = 8, max_windows: int | None = None
) -> PerplexityResult:
    """Token-level perplexity of ``text`` under ``model`` (windowing in the module docstring)."""
    total_nll, total_tokens = 0.0, 0
    for input_ids in _batches(text_windows(tokenizer, text, seq_len, max_windows), batch_size):
        total_nll += _target_nll(_next_token_log_probs(model, input_ids), input_ids)
        total_tokens += input_ids[:, 1:].numel()
    return _perplexity_result(total_nll, total_tokens)


def kl_divergence(
    reference_model,
    model,
    tokenizer,
    text: str,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
) -> KLResult:
    """Mean KL(reference || model) of the next-token distributions at every predicted position.

    It measures how far compression moved the model's predictions, whatever the text's domain.
    """
    return kl_divergences(reference_model, {"model": model}, tokenizer, text, seq_len, batch_size, max_windows)["model"]


@torch.no_grad()
def kl_divergences(
    reference_model,
    models: Mapping[str, torch.nn.Module],
    tokenizer,
    text: str,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
) -> dict[str, KLResult]:
    """``kl_divergence`` of each of ``models`` (by name), with one reference pass per batch shared by them all:
    comparing several compressed models costs one reference pass, not one each."""
    totals = {name: {"kl": 0.0, "nll": 0.0, "window_kl": []} for name in models}
    reference_nll, total_tokens = 0.0, 0
    for input_ids in _batches(text_windows(tokenizer, text, seq_len, max_windows), batch_size):
        reference = _next_token_log_probs(reference_model, input_ids)
        for name, model in models.items():
            candidate = _next_token_log_probs(model, input_ids).to(reference.device)
            per_window = F.kl_div(candidate, reference, log_target=True, reduction="none").sum(dim=(1, 2))
            totals[name]["kl"] += float(per_window.sum())
            totals[name]["window_kl"] += (per_window / (input_ids.shape[1] - 1)).tolist()
            totals[name]["nll"] += _target_nll(candidate, input_ids)
            del candidate
        reference_nll += _target_nll(reference, input_ids)
        total_tokens += input_ids[:, 1:].numel()
    return {
        name: KLResult(
            tokens=total_tokens,
            kl=total["kl"] / total_tokens,
            model=_perplexity_result(total["nll"], total_tokens),
            reference=_perplexity_result(reference_nll, total_tokens),
            window_kl=total["window_kl"],
        )
        for name, total in totals.items()
    }


def wikitext_rows(path: str | Path) -> list[str]:
    """The rows of a WikiText raw file as the Hugging Face ``wikitext`` builder yields them: each line
    with its newline kept, and whitespace-only lines as empty strings."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"WikiText file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def wikitext_eval_text(path: str | Path) -> str:
    """WikiText text for perplexity the way the pruning literature builds it (GPTQ, SparseGPT, Wanda,
    whose LLaMA-2 numbers docs/results.md cites): ``"\\n\\n".join`` of the Hugging Face rows. Used everywhere
    in this project, so our WikiText numbers share one preprocessing."""
    return "\n\n".join(wikitext_rows(path))


@dataclass(frozen=True)
class NMModuleReport:
    """One Linear's N:M check in storage order: groups are ``m`` consecutive input columns of a row."""

    name: str
    shape: tuple[int, int]
    groups: int
    violating_groups: int
    density: float

    @property
    def ok(self) -> bool:
        return self.groups > 0 and self.violating_groups == 0


@dataclass(frozen=True)
class NMSparsityReport:
    n: int
    m: int
    modules: list[NMModuleReport]

    @property
    def ok(self) -> bool:
        return bool(self.modules) and all(module.ok for module in self.modules)

    @property
    def failures(self) -> list[NMModuleReport]:
        return [module for module in self.modules if not module.ok]


def check_nm_sparsity(
    model: torch.nn.Module, n: int, m: int, ignore: Iterable[str] = ("re:.*lm_head",)
) -> NMSparsityReport:
    """Check that every Linear (outside ``ignore``) has at most ``n`` non-zeros in each group of ``m``
    consecutive input columns, in the order the weights are stored (what a 2:4 kernel reads).

    ``ignore`` uses llm-compressor's matching (exact names, ``re:`` prefixes, class names), so a
    recipe's ``ignore`` list can be passed as is. A Linear whose input dimension is not a multiple of
    ``m`` reports 0 groups and is not ok.
    """
    reports = []
    for name, module in match_named_modules(model, ["Linear"], list(ignore)):
        weight = module.weight.detach()
        rows, cols = weight.shape
        nonzero = weight != 0
        if cols % m:
            groups, violating = 0, 0
        else:
            per_group = nonzero.reshape(rows, cols // m, m).sum(dim=-1)
            groups, violating = per_group.numel(), int((per_group > n).sum())
        density = nonzero.float().mean().item()
        reports.append(NMModuleReport(name, (rows, cols), groups, violating, density))
    return NMSparsityReport(n=n, m=m, modules=reports)


@torch.no_grad()
def layer_reconstruction_errors(
    reference_model: torch.nn.Module,
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    ignore: Iterable[str] = ("re:.*lm_head",),
) -> dict[str, float]:
    """Per-Linear output error of ``model``'s weights on the inputs the reference model sees:
    ``||X (W_ref - W)^T||^2 / ||X W_ref^T||^2`` summed over every token of ``text`` (windowed as above).

    The layer-wise damage a pruner did, without the error it inherits from earlier layers. The
    reference must be in ``model``'s channel order: fold a checkpoint's saved permutations into the
    dense model first (`learned_permutation.fold_saved_permutations`). Memory: one extra matmul output
    per Linear at a time; nothing of size ``in_features ** 2`` is kept.
    """
    candidates = dict(match_named_modules(model, ["Linear"], list(ignore)))
    error: dict[str, float] = dict.fromkeys(candidates, 0.0)
    energy: dict[str, float] = dict.fromkeys(candidates, 0.0)

    def accumulate(name: str, weight: torch.Tensor):
        def hook(module, args, _output):
            inputs = args[0]
            reference_out = F.linear(inputs, module.weight)
            error[name] += (reference_out - F.linear(inputs, weight.to(inputs.device))).pow(2).sum().item()
            energy[name] += reference_out.pow(2).sum().item()

        return hook

    handles = []
    for name, module in match_named_modules(reference_model, ["Linear"], list(ignore)):
        if name not in candidates:
            raise ValueError(f"{name} is in the reference model but not in the compared model")
        handles.append(module.register_forward_hook(accumulate(name, candidates[name].weight.detach())))
    try:
        for input_ids in _batches(text_windows(tokenizer, text, seq_len, max_windows), batch_size):
            reference_model(input_ids.to(next(reference_model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: error[name] / energy[name] if energy[name] > 0 else 0.0 for name in candidates}
