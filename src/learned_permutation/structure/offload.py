"""Reading and writing parameters of modules that compressed-tensors may have offloaded.

llm-compressor's sequential pipeline calls `set_onload_device`, which replaces every module's
`_parameters` with an `OffloadCache`: reading an attribute onloads a copy, and only
`update_offload_parameter` writes through to the offloaded storage (CPU memory or disk).

Under torch.distributed, CPU and disk offloads are one storage that every rank shares
(`DistributedCPUCache`, `DistributedDiskCache`), and compressed-tensors leaves it to the caller that
one rank writes it at a time; a permutation read and written by every rank would be applied once per
rank. So there the source rank writes alone, between barriers (`write_parameter`).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.distributed as dist
from compressed_tensors.distributed import is_distributed, is_source_process
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.offload.cache import DistributedCPUCache, DistributedDiskCache, OffloadCache

SHARED_ACROSS_RANKS = (DistributedCPUCache, DistributedDiskCache)


def stored_tensor(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The tensor that holds the parameter without onloading it (a meta tensor when on disk)."""
    params = module._parameters
    return params.offloaded_values.get(name) if isinstance(params, OffloadCache) else params.get(name)


def read_parameter(module: torch.nn.Module, name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The parameter's current value, detached: onloaded to the module's execution device, or on `device`.

    When the stored (offloaded) tensor already lives on `device` it is returned as is, so reading
    every layer's weights to the CPU does not onload them all to the accelerator first.
    """
    stored = stored_tensor(module, name)
    if device is not None and not stored.is_meta and stored.device == torch.device(device):
        return stored.detach()
    value = getattr(module, name).detach()
    return value if device is None else value.to(device)


def write_parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Store `value` as parameter `name`, through the offload cache. Every rank calls it with the same
    value; storage shared across ranks is written by the source rank only, after every rank has read
    the old value and before any rank reads the new one."""
    if not (is_distributed() and isinstance(module._parameters, SHARED_ACROSS_RANKS)):
        update_offload_parameter(module, name, value)
        return
    dist.barrier()
    if is_source_process():
        update_offload_parameter(module, name, value)
    else:
        _refresh_onloaded_copy(module, name, value)
    dist.barrier()


def _refresh_onloaded_copy(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """What `update_offload_parameter` does to this rank's onloaded copy, which the cache keeps while
    offloading is disabled (as in llm-compressor's sequential pipeline), without writing the storage."""
    cache = module._parameters if name in module._parameters else module._buffers
    offloaded = cache.offloaded_values[name]
    onloaded = OffloadCache.keep_onloaded_values.get(offloaded)
    if onloaded is not None and onloaded is not offloaded:
        onloaded.copy_(value)


def storage_key(module: torch.nn.Module, name: str) -> Hashable:
    """Identity of the tensor that stores the parameter, so tied parameters are permuted once.

    Offloaded parameters are identified by their offloaded tensor (shared between tied modules
    on CPU; disk offloading gives each module its own file, so those are no longer tied).
    """
    stored = stored_tensor(module, name)
    if stored.is_meta:
        return id(stored)
    return stored.untyped_storage().data_ptr(), stored.storage_offset()
