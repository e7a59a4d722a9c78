"""Deterministic, time-bounded, resumable pre-training loop for a `LlamaForCausalLM`.

Batch ``s`` is drawn from a generator seeded by ``(seed, s)``, and the learning rate is a pure function of the
step, so a run resumed from a saved state continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from loguru import logger

from training.presets import Preset


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    warmup_steps: int
    seed: int
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    final_lr_fraction: float = 0.1
    eval_every: int = 100
    eval_windows: int = 16


@dataclass
class TrainOutcome:
    steps_done: int
    finished: bool
    stop_reason: str
    train_seconds: float
    history: list[dict] = field(default_factory=list)


def build_model(preset: Preset, vocab_size: int, seq_len: int, tokenizer, seed: int):
    """A freshly initialised Llama with the preset's shape; the seed fixes the initial weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **preset.model_shape(),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to ``final_lr_fraction`` of it at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.learning_rate * (cfg.final_lr_fraction + (1.0 - cfg.final_lr_fraction) * cosine)


def sample_batch(tokens: torch.Tensor, cfg: TrainConfig, step: int) -> torch.Tensor:
    """``[batch_size, seq_len]`` windows at random offsets of the training stream, fixed by (seed, step)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - cfg.seq_len + 1, (cfg.batch_size,), generator=generator)
    return tokens[starts[:, None] + torch.arange(cfg.seq_len)]


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norm gains)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    windows = windows.to(model.device)
    loss = model(input_ids=windows, labels=windows).loss.item()
    model.train(was_training)
    return loss


def _load_state(state_path: Path, model, optimizer, cfg: TrainConfig) -> tuple[int, float, list[dict]]:
    if not state_path.exists():
        return 0, 0.0, []
    state = torch.load(state_path, map_location=model.device, weights_only=False)
    if state["config"] != asdict(cfg):
        raise ValueError(
            f"saved training state {state_path} was made with different settings {state['config']}; "
            "rerun with the same options, or pass --fresh to discard it"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info(f"resuming from step {state['step']} ({state['elapsed']:.0f}s already spent)")
    return state["step"], state["elapsed"], state["history"]


def _save_state(state_path: Path, model, optimizer, cfg, step, elapsed, history) -> None:
    state_path.parent.mkdir(parents=True, exist_ok=True)
    partial = state_path.with_suffix(".tmp")
    state = {"config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "step": step, "elapsed": elapsed, "history": history}
    torch.save(state, partial)
    partial.replace(state_path)


def train(
    model,
    train_tokens: torch.Tensor,
    val_windows: torch.Tensor,
    cfg: TrainConfig,
    state_path: Path,
    max_minutes: float | None = None,
    stop_at_step: int | None = None,
    checkpoint_minutes: float = 5.0,
) -> TrainOutcome:
    """Train until ``max_steps``; stop early (with a resumable state) at ``stop_at_step`` or after ``max_minutes``
    of training time in this process. Training state is saved every ``checkpoint_minutes`` and at every stop."""
    if len(train_tokens) <= cfg.seq_len:
        raise ValueError(f"training stream has {len(train_tokens)} tokens, fewer than --seq-len {cfg.seq_len}")
    optimizer = make_optimizer(model, cfg)
    step, elapsed, history = _load_state(state_path, model, optimizer, cfg)
    if stop_at_step is not None and step > stop_at_step:
        raise ValueError(f"saved state {state_path} is already at step {step}, past --stop-at-step {stop_at_step}; "
                         "pass --fresh to retrain from step 0")
    model.train()
    started = last_save = time.monotonic()
    stop_reason = "max_steps"
    while step < cfg.max_steps:
        if stop_at_step is not None and step >= stop_at_step:
            stop_reason = "stop_at_step"
            break
        if max_minutes is not None and time.monotonic() - started > 60 * max_minutes:
            stop_reason = "max_minutes"
            break
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(train_tokens, cfg, step).to(model.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            now = elapsed + time.monotonic() - started
            record = {"step": step, "lr": lr, "train_loss": loss.item(), "grad_norm": grad_norm.item(),
                      "val_loss": mean_loss(model, val_windows[: cfg.eval_windows]), "seconds": round(now, 1)}
            history.append(record)
            tokens_per_s = step * cfg.batch_size * cfg.seq_len / max(now, 1e-9)
            logger.info(f"step {step}/{cfg.max_steps} lr {lr:.2e} train {record['train_loss']:.3f} "
                        f"val {record['val_loss']:.3f} |g| {record['grad_norm']:.2f} {tokens_per_s:.0f} tok/s")
        if time.monotonic() - last_save > 60 * checkpoint_minutes:
            _save_state(state_path, model, optimizer, cfg, step, elapsed + time.monotonic() - started, history)
            last_save = time.monotonic()
    elapsed += time.monotonic() - started
    _save_state(state_path, model, optimizer, cfg, step, elapsed, history)
    return TrainOutcome(step, step >= cfg.max_steps, stop_reason, elapsed, history)
