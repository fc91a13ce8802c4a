"""Activation offloading: autograd keeps the tensors it saves for backward on the CPU.

Only tensors that offloading actually frees are moved: parameters, buffers and their views stay where
they are (the model holds them anyway, so a copy would only add memory), as do tensors already on the
CPU and tensors smaller than ``min_offload_bytes`` (the copy costs more than it frees).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["DEFAULT_MIN_OFFLOAD_BYTES", "offload_saved_tensors"]

DEFAULT_MIN_OFFLOAD_BYTES = 1024
"""Saved tensors smaller than this many bytes are not offloaded by default."""


def _owned_storages(module: nn.Module) -> set[int]:
    """Addresses of the storages of ``module``'s parameters and buffers.

    Tensor subclasses without a storage of their own are skipped: FSDP2's sharded DTensor parameters,
    which an offload wrapper around a ``fully_shard``-ed module sees because that module's pre-forward
    hook has not yet swapped the unsharded parameters in. Forward saves those unsharded parameters,
    leaves that need a gradient, which :func:`_is_parameter_like` recognises without the set.
    """
    return {
        t.untyped_storage().data_ptr()
        for t in (*module.parameters(), *module.buffers())
        if not is_traceable_wrapper_subclass(t)
    }


def _is_parameter_like(tensor: torch.Tensor, owned_storages: set[int]) -> bool:
    base = tensor._base if tensor._base is not None else tensor
    if base.is_leaf and base.requires_grad:
        return True  # a parameter (or a flat parameter's view, as FSDP1 makes them)
    return tensor.untyped_storage().data_ptr() in owned_storages


@contextmanager
def offload_saved_tensors(
    module: nn.Module,
    *,
    pin_memory: bool = True,
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
) -> Iterator[None]:
    """Moves the activations that autograd saves inside this context to CPU memory.

    Args:
        module: The module running inside the context; its parameters and buffers are never copied.
        pin_memory: Copy into page-locked memory so the copy back to the accelerator can overlap.
            Ignored when CUDA is not available.
        min_offload_bytes: Saved tensors smaller than this stay on their device.

    Raises:
        ValueError: ``min_offload_bytes`` is negative.

    Example:
        >>> block = nn.Linear(4, 4)
        >>> with offload_saved_tensors(block, pin_memory=False):
        ...     loss = block(torch.randn(2, 4)).sum()
        >>> loss.backward()
    """
    if min_offload_bytes < 0:
        raise ValueError(f"min_offload_bytes must be >= 0, got {min_offload_bytes}.")
    # Storages are compared by address: FSDP2 swaps unsharded parameters in during forward, so the
    # set is taken when the context is entered, not when the module was wrapped.
    owned = _owned_storages(module)
    pin = pin_memory and torch.cuda.is_available()

    def pack(tensor: torch.Tensor) -> Any:
        if (
            tensor.device.type == "cpu"
            or tensor.untyped_storage().nbytes() < min_offload_bytes
            or _is_parameter_like(tensor, owned)
        ):
            return tensor
        packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        packed.copy_(tensor)
        return (tensor.device, packed)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, cpu_tensor = packed
        return cpu_tensor.to(device, non_blocking=pin)

    with saved_tensors_hooks(pack, unpack):
        yield
