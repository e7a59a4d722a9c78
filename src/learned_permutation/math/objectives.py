"""What a permutation is worth: retained pruning score and output reconstruction error.

Everything is evaluated in the site's original channel order: the pruner's mask is taken in the
permuted order and scattered back, so ``tr(dW_p H_p dW_p^T) == tr(dW H dW^T)`` needs no permuted
Hessian copy. Rows are processed in chunks of ``CHUNK_ELEMENTS``, so a temporary is a few MiB whatever the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from .masks import check_divisible, check_nm, nm_mask
from .permutations import check_permutation
from .scores import score as pruning_score
from .threads import dense_threads

# Rows per chunk = CHUNK_ELEMENTS // channels: 4 MiB of fp32 per buffer. 16 MiB buffers were the modifier's
# peak on a quarter of Llama-3.2-1B's layer (the report's objectives, results/scale/layer_pass_memory.md).
CHUNK_ELEMENTS = 1 << 20


@dataclass
class Consumer:
    """One weight ``[out, c]`` whose input columns carry the site's ``c`` channels, with its input statistics.

    ``hessian`` is ``X^T X`` and ``act_sq`` its diagonal (sum of squared inputs per channel); the
    diagonal is derived from the Hessian when only the Hessian is given.
    """

    weight: torch.Tensor
    hessian: torch.Tensor | None = None
    act_sq: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise ValueError(f"consumer weight must be 2-D [out, in], got shape {tuple(self.weight.shape)}")
        channels = self.weight.shape[1]
        _check_finite("weight", self.weight)
        if self.hessian is not None:
            if tuple(self.hessian.shape) != (channels, channels):
                raise ValueError(
                    f"hessian shape {tuple(self.hessian.shape)} does not match the weight's "
                    f"{channels} input channels (expected ({channels}, {channels}))"
                )
            _check_finite("hessian", self.hessian)
        if self.act_sq is not None:
            if tuple(self.act_sq.shape) != (channels,):
                raise ValueError(
                    f"act_sq shape {tuple(self.act_sq.shape)} does not match the weight's {channels} input channels"
                )
            _check_finite("act_sq", self.act_sq)
            if bool((self.act_sq < 0).any()):
                raise ValueError("act_sq holds negative values; it must be a sum of squared inputs")
        elif self.hessian is not None:
            self.act_sq = self.hessian.diagonal().clone()

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    def weighted_rows(self, sensitivity: torch.Tensor) -> Consumer:
        """This consumer in fp32 with each output row scaled by the square root of its loss ``sensitivity``
        (one value per row), so that a row's reconstruction error counts in proportion to the loss it costs."""
        if tuple(sensitivity.shape) != (self.weight.shape[0],):
            raise ValueError(f"sensitivity shape {tuple(sensitivity.shape)} does not match the weight's "
                             f"{self.weight.shape[0]} output rows")
        scale = sensitivity.to(self.weight.device, torch.float32).sqrt()[:, None]
        return Consumer(weight=self.weight.float() * scale, hessian=self.hessian, act_sq=self.act_sq)


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"consumer {name} contains NaN or inf; check the calibration statistics / weights")


@dataclass
class PreparedConsumer:
    """A consumer in fp32 with its pruning score computed once (scores are permutation-equivariant), stored
    channel-major (``_channel_major``)."""

    weight: torch.Tensor
    score: torch.Tensor
    hessian: torch.Tensor | None
    act_sq: torch.Tensor | None
    total_score: float = field(init=False)

    def __post_init__(self) -> None:
        self.total_score = float(self.score.sum())

    @cached_property
    def output_energy(self) -> float:
        """``tr(W H W^T)``, computed on first use: only the reconstruction error needs it, and with a full
        Hessian it costs as much as one error evaluation."""
        if not self.has_statistics:
            return float("nan")
        with dense_threads():
            return sum(float(quadratic_form(chunk, self.hessian, self.act_sq)) for chunk in self.weight.split(self.chunk_rows))

    @property
    def has_statistics(self) -> bool:
        return self.hessian is not None or self.act_sq is not None

    @property
    def chunk_rows(self) -> int:
        return max(1, CHUNK_ELEMENTS // self.weight.shape[1])

    def kept_mask(self, rows: slice | torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """The pruner's N:M mask of ``W[:, perm]``, scattered back to the original channel order."""
        return mask_in_original_order(self.score[rows], perm, n, m)

    def pruned_part(self, rows: slice | torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """``dW`` (the weights the pruner removes) for these rows, in the original channel order."""
        weight = self.weight[rows]
        return weight * ~self.kept_mask(rows, perm, n, m)

    def row_chunks(self) -> list[slice]:
        step = self.chunk_rows
        return [slice(start, start + step) for start in range(0, self.weight.shape[0], step)]


def mask_in_original_order(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    permuted = nm_mask(scores[:, perm], n, m)
    mask = torch.empty_like(permuted)
    mask[:, perm] = permuted
    return mask


def quadratic_form(delta: torch.Tensor, hessian: torch.Tensor | None, act_sq: torch.Tensor | None) -> torch.Tensor:
    """``tr(delta H delta^T)``, with ``H = diag(act_sq)`` when no full Hessian is known (then one
    temporary of ``delta``'s size, not two: the weighting is a matrix-vector product)."""
    if hessian is not None:
        return ((delta @ hessian) * delta).sum()
    return (delta.square() @ act_sq).sum()


class SiteProblem:
    """The consumers of one permutation site, prepared once for repeated objective evaluations."""

    def __init__(self, consumers: list[Consumer], n: int, m: int, score_kind: str) -> None:
        if not consumers:
            raise ValueError("a permutation site needs at least one consumer")
        check_nm(n, m)
        channels = consumers[0].channels
        for consumer in consumers:
            if consumer.channels != channels:
                raise ValueError(
                    f"consumers disagree on the site's channel count ({consumer.channels} vs {channels}); "
                    "all must read the same channels"
                )
        check_divisible(channels, m)
        self.n, self.m, self.channels, self.score_kind = n, m, channels, score_kind
        self.consumers = [_prepare(consumer, score_kind) for consumer in consumers]
        self.device = consumers[0].weight.device

    def retained_score(self, perm: torch.Tensor) -> float:
        kept = 0.0
        for consumer in self.consumers:
            for rows in consumer.row_chunks():
                kept += float((consumer.score[rows] * consumer.kept_mask(rows, perm, self.n, self.m)).sum())
        return kept / max(sum(consumer.total_score for consumer in self.consumers), 1e-30)

    def reconstruction_error(self, perm: torch.Tensor) -> float:
        self._require_statistics()
        lost = 0.0
        with dense_threads():
            for consumer in self.consumers:
                for rows in consumer.row_chunks():
                    delta = consumer.pruned_part(rows, perm, self.n, self.m)
                    lost += float(quadratic_form(delta, consumer.hessian, consumer.act_sq))
        return lost / max(sum(consumer.output_energy for consumer in self.consumers), 1e-30)

    def _require_statistics(self) -> None:
        if not all(consumer.has_statistics for consumer in self.consumers):
            raise ValueError("the reconstruction error needs a hessian or act_sq for every consumer")


def _prepare(consumer: Consumer, score_kind: str) -> PreparedConsumer:
    weight = consumer.weight.detach().float()
    hessian = None if consumer.hessian is None else consumer.hessian.detach().float()
    act_sq = None if consumer.act_sq is None else consumer.act_sq.detach().float()
    scores = pruning_score(score_kind, weight, act_sq=act_sq, hessian=hessian)
    return PreparedConsumer(weight=weight, score=_channel_major(scores), hessian=hessian, act_sq=act_sq)


def _channel_major(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` stored channel by channel (a ``[rows, channels]`` view of a ``[channels, rows]`` tensor):
    solvers gather channels (columns), and ``greedy``'s group sums read each channel's rows as one run, so
    this one copy serves them all (``greedy`` needs no transposed copy of its own)."""
    return scores.T.contiguous().T


def retained_score(
    consumers: list[Consumer], perm: torch.Tensor, n: int, m: int, score_kind: str, block_size: int | None = None
) -> float:
    """Share of the total pruning score that the N:M mask of the permuted weights keeps, in [0, 1]."""
    problem = SiteProblem(consumers, n, m, score_kind)
    check_permutation(perm, problem.channels, block_size)
    return problem.retained_score(perm.to(problem.device).long())


def reconstruction_error(
    consumers: list[Consumer], perm: torch.Tensor, n: int, m: int, score_kind: str, block_size: int | None = None
) -> float:
    """``sum_i tr(dW_i H_i dW_i^T) / sum_i tr(W_i H_i W_i^T)``: relative output energy lost to pruning."""
    problem = SiteProblem(consumers, n, m, score_kind)
    check_permutation(perm, problem.channels, block_size)
    return problem.reconstruction_error(perm.to(problem.device).long())


def sampled_score_rows(problem: SiteProblem, max_rows: int | None, generator: torch.Generator) -> torch.Tensor:
    """Score rows of all consumers stacked (a seeded random subset of ``max_rows`` rows when there are more)."""
    sizes = [consumer.score.shape[0] for consumer in problem.consumers]
    total = sum(sizes)
    if max_rows is None or total <= max_rows:  # read-only for the solvers: one consumer's scores are not copied
        scores = [consumer.score for consumer in problem.consumers]
        return scores[0] if len(scores) == 1 else torch.cat(scores)
    chosen = torch.randperm(total, generator=generator)[:max_rows].sort().values
    parts, start = [], 0
    for consumer, size in zip(problem.consumers, sizes):
        local = chosen[(chosen >= start) & (chosen < start + size)] - start
        parts.append(consumer.score[local.to(consumer.score.device)])
        start += size
    return torch.cat(parts)
