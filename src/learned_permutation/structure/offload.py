"""Reading and writing parameters of modules that compressed-tensors may have offloaded.

llm-compressor's sequential pipeline calls `set_onload_device`, which replaces every module's
`_parameters` with an `OffloadCache`: reading an attribute onloads a copy, and only
`update_offload_parameter` writes through to the offloaded storage (CPU memory or disk).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.offload.cache import OffloadCache


def read_parameter(module: torch.nn.Module, name: str, device: torch.device | None = None) -> torch.Tensor:
    """The parameter's current value (onloaded if offloaded), detached, optionally moved to `device`."""
    value = getattr(module, name).detach()
    return value if device is None else value.to(device)


def permute_parameter(module: torch.nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    """Replace parameter `name` by its `index_select` along `dim`, through the offload cache."""
    value = read_parameter(module, name)
    update_offload_parameter(module, name, value.index_select(dim, index.to(value.device)))


def storage_key(module: torch.nn.Module, name: str) -> Hashable:
    """Identity of the tensor that stores the parameter, so tied parameters are permuted once.

    Offloaded parameters are identified by their offloaded tensor (shared between tied modules
    on CPU; disk offloading gives each module its own file, so those are no longer tied).
    """
    params = module._parameters
    stored = params.offloaded_values[name] if isinstance(params, OffloadCache) else params[name]
    if stored.is_meta:
        return id(stored)
    return stored.untyped_storage().data_ptr(), stored.storage_offset()
