"""Exact accounting of the tensor memory a block of code allocates, on any device, with where it was allocated.

``LiveTensors`` is a ``TorchDispatchMode``: every storage an operator returns is counted until the storage
is freed (a finalizer on the storage's Python object, which torch keeps alive exactly as long as the
storage), so its ``peak`` is the high-water mark of the bytes allocated inside the block and still alive,
the quantity ``torch.cuda.max_memory_allocated`` measures on a GPU, without allocator rounding or heap
fragmentation. At each new peak the live allocations of at least ``site_bytes`` are recorded with the
innermost frame of this repository's code (or llm-compressor's) that allocated them, so ``at_peak()`` says
what the peak is made of. Tensors that existed before the block (weights, the calibration sample) are
not counted.
"""

from __future__ import annotations

import traceback
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

OWN_CODE = ("learned_permutation", "llmcompressor", "benchmarks")


class LiveTensors(TorchDispatchMode):
    def __init__(self, site_bytes: int = 1 << 20):
        super().__init__()
        self.site_bytes = site_bytes
        self.live: dict[int, tuple[int, str]] = {}  # id of the storage object -> (bytes, allocating line)
        self.current = self.peak = 0
        self._peak_sites: list[tuple[int, str]] = []
        self._recorded_peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        inputs = {id(value.untyped_storage()) for value in tree_flatten((args, kwargs))[0]
                  if isinstance(value, torch.Tensor) and value.device.type != "meta"}
        for value in tree_flatten(output)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                storage = value.untyped_storage()
                if id(storage) not in inputs:  # an alias of an input (a view, a no-op ``to``) allocates nothing
                    self._count(storage)
        return output

    def _count(self, storage) -> None:
        key = id(storage)
        if key in self.live:
            return
        size = storage.nbytes()
        site = _allocating_line() if size >= self.site_bytes else "small"
        self.live[key] = (size, site)
        weakref.finalize(storage, self._free, key)
        self.current += size
        if self.current > self.peak:
            self.peak = self.current
            if self.peak >= self._recorded_peak + self.site_bytes:
                self._recorded_peak = self.peak
                self._peak_sites = list(self.live.values())

    def _free(self, key: int) -> None:
        size, _ = self.live.pop(key)
        self.current -= size

    def at_peak(self) -> list[tuple[str, float, int]]:
        """(allocating line, MiB, tensors) of what was alive at the recorded peak, largest first."""
        mib, count = Counter(), Counter()
        for size, site in self._peak_sites:
            mib[site] += size / 2**20
            count[site] += 1
        return [(site, total, count[site]) for site, total in mib.most_common()]


def _allocating_line() -> str:
    """The innermost frame in this repository's or llm-compressor's code, its line, and the three frames that called it."""
    frames = [f for f in traceback.extract_stack()[:-3] if any(part in f.filename for part in OWN_CODE)
              and not f.filename.endswith("live_tensors.py")]
    if not frames:
        return "elsewhere"
    inner = frames[-1]
    callers = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames[-4:-1]))
    return f"{inner.filename.rsplit('/', 1)[-1]}:{inner.lineno} {inner.name}: {inner.line} (< {callers})"
