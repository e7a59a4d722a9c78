"""Inclusive seconds and calls of named functions inside a block, the accelerator's queue drained at each
boundary so the seconds are the function's own on a GPU too (the timing itself slows the block a little).

    with FunctionTimes(["learned_permutation.plugin.selection:head_losses", ...]) as times:
        ...
    print(times.table())

A name is ``module:function``, ``module:Class.method`` or ``module:TABLE[key]`` (an entry of a dict of
functions); each is wrapped for the block and restored after. Wrap a function where it is looked up: a
name imported into another module is that module's attribute.
Nested functions each count their whole time, so rows do not add up.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections import Counter

import torch


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class FunctionTimes:
    def __init__(self, names: list[str]):
        self.names = names
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()
        self._restore: list[tuple[object, str, object]] = []

    def __enter__(self) -> "FunctionTimes":
        for name in self.names:
            module_name, _, path = name.partition(":")
            owner = importlib.import_module(module_name)
            path, _, key = path.rstrip("]").partition("[")
            *parents, attribute = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            if key:
                owner, attribute = owner.__dict__[attribute], key
                original = owner[key]
            else:
                original = owner.__dict__[attribute]
            self._restore.append((owner, attribute, original))
            self._set(owner, attribute, self._timed(name.partition(":")[2], original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attribute, original in reversed(self._restore):
            self._set(owner, attribute, original)
        self._restore.clear()

    @staticmethod
    def _set(owner, attribute: str, value) -> None:
        if isinstance(owner, dict):
            owner[attribute] = value
        else:
            setattr(owner, attribute, value)

    def _timed(self, label: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            _synchronize()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                _synchronize()
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        return timed

    def rows(self) -> list[tuple[str, float, int]]:
        """(function, inclusive seconds, calls), the slowest first."""
        return [(label, seconds, self.calls[label]) for label, seconds in self.seconds.most_common()]
