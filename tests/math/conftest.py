from __future__ import annotations

import pytest
import torch

from learned_permutation.math import Consumer


def correlated_consumer(out: int, channels: int, seed: int = 0, samples: int = 256) -> tuple[Consumer, torch.Tensor]:
    """A consumer with heavy-tailed channel scales and correlated inputs, and the inputs X it came from."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.rand(channels, generator=generator).pow(3) * 4 + 0.05
    mixing = torch.randn(channels, channels, generator=generator) * 0.3 + torch.eye(channels)
    inputs = (torch.randn(samples, channels, generator=generator) @ mixing) * scales
    weight = torch.randn(out, channels, generator=generator)
    return Consumer(weight, hessian=inputs.T @ inputs), inputs


@pytest.fixture
def make_consumer():
    return correlated_consumer


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors run faster without thread hand-offs (the CI machine has 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
