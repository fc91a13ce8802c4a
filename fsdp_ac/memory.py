"""Deterministic measurement of the activation memory a forward pass holds for backward.

Allocator statistics are noisy on the CPU and absent without CUDA. Instead, a dispatch mode records a
weak reference to every storage an operator creates during forward; once forward returns, the
storages still alive are exactly what autograd (or the caller) holds. Their bytes, de-duplicated by
storage and excluding the model's parameters and buffers, are the activation memory. The figure is the
same on every run and every machine for the same model and input.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import nn

from fsdp_ac._compat import StorageWeakRef, TorchDispatchMode, storage_from_weak_ref, tree_leaves

__all__ = ["ActivationMemoryMeter"]


class ActivationMemoryMeter(TorchDispatchMode):
    """Measures the bytes of activations alive when a forward pass returns.

    Enter it around the forward pass only (not backward); read :attr:`held_bytes` after it exits,
    while the forward's output (e.g. the loss) is still referenced.

    Args:
        module: The model whose parameters and buffers are not counted. Under FSDP2 its unsharded
            parameters are found through ``module.parameters()`` after forward and excluded too.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        >>> with ActivationMemoryMeter(model) as meter:
        ...     loss = model(torch.randn(8, 64)).sum()
        >>> meter.held_bytes > 0
        True
    """

    def __init__(self, module: nn.Module | None = None) -> None:
        super().__init__()
        self._module = module
        self._created: dict[int, StorageWeakRef] = {}
        self.held_bytes: int = 0
        """Bytes of storages created during the measured region and alive at its end."""

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
                ref = StorageWeakRef(leaf.untyped_storage())
                self._created.setdefault(ref.cdata, ref)
        return out

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        excluded: set[int] = set()
        if self._module is not None:
            for tensor in (*self._module.parameters(), *self._module.buffers()):
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                excluded.add(StorageWeakRef(local.untyped_storage()).cdata)
        total = 0
        for cdata, ref in self._created.items():
            if ref.expired() or cdata in excluded:
                continue
            storage = storage_from_weak_ref(ref)
            if storage is not None:
                total += storage.nbytes()
        self._created.clear()
        self.held_bytes = total
