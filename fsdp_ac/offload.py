"""Activation offloading: autograd keeps the tensors it saves for backward in host (CPU) memory.

Only tensors that offloading actually frees are moved: parameters, buffers and their views stay where
they are (the model holds them anyway, so a copy would only add memory), as do tensors already on the
CPU and tensors smaller than ``min_offload_bytes`` (the copy costs more than it frees). Tensor
subclasses such as DTensor are offloaded through their inner tensors (``__tensor_flatten__``), so a
copy has the local shape and is rebuilt around the same spec on the way back.

The pieces are small functions so that other offload engines (e.g. one copying on a side stream)
can reuse them: :func:`decide` says what happens to one saved tensor, :func:`pins` whether its host
copy is page-locked, and :func:`pack_saved_tensor` / :func:`unpack_saved_tensor` are the pair of
``saved_tensors_hooks`` that :func:`offload_saved_tensors` installs.

On a machine without an accelerator every activation already lives on the CPU, so offloading has
nothing to move. ``copy_cpu_tensors=True`` copies those too, into separate CPU memory that plays the
host's part: it frees nothing, but runs every decision and every copy for real, which is how the
test suite checks offloading on CPU.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = [
    "DEFAULT_MIN_OFFLOAD_BYTES",
    "Decision",
    "FlattenedCopy",
    "HostCopy",
    "OffloadOptions",
    "Packed",
    "decide",
    "offload_saved_tensors",
    "owned_storages",
    "pack_saved_tensor",
    "pins",
    "unpack_saved_tensor",
]

DEFAULT_MIN_OFFLOAD_BYTES = 1024
"""Saved tensors smaller than this many bytes are not offloaded by default."""


@dataclass(frozen=True)
class OffloadOptions:
    """What an offload copies, and how.

    Raises:
        ValueError: ``min_offload_bytes`` is negative.
    """

    pin_memory: bool = True
    """Copy into page-locked memory so the copy back to the accelerator can overlap; applies to
    tensors copied from a CUDA device only (see :func:`pins`)."""
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES
    """Saved tensors whose storage is smaller than this stay on their device."""
    copy_cpu_tensors: bool = False
    """Also copy saved tensors that already live in CPU memory, into separate CPU memory. This frees
    nothing and costs a copy; it makes a machine without an accelerator (tests, CI) run the offload
    path for real: the same decisions, the same copies, backward reading the copies."""

    def __post_init__(self) -> None:
        if self.min_offload_bytes < 0:
            raise ValueError(
                f"min_offload_bytes must be >= 0 (a size in bytes), got {self.min_offload_bytes}."
            )


class Decision(enum.Enum):
    """What offloading does with one tensor that autograd saves for backward."""

    COPY = "copied to host memory"
    FLATTEN = "a tensor subclass: each of its inner tensors is decided on its own"
    PARAMETER = "a parameter, a view of one, or another leaf that requires grad: its owner holds it"
    MODULE_STATE = "shares its storage with a parameter or buffer of the module"
    ON_HOST = "already in CPU memory"
    SMALL = "its storage is smaller than min_offload_bytes"
    NOT_STRIDED = "a sparse or other non-strided layout, which has no plain storage to copy"


def _flatten(tensor: torch.Tensor) -> tuple[dict[str, object], Any] | None:
    """A traceable wrapper subclass's inner attributes by name, with its flatten context.

    The attributes are tensors, or other objects the subclass needs back (DTensor's device mesh).
    None for any other tensor.
    """
    if not is_traceable_wrapper_subclass(tensor):
        return None
    names, context = tensor.__tensor_flatten__()
    return {name: getattr(tensor, name) for name in names}, context


def _inner_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors inside ``tensor``: itself, or a wrapper subclass's inner ones, recursively."""
    flat = _flatten(tensor)
    if flat is None:
        yield tensor
        return
    for value in flat[0].values():
        if isinstance(value, torch.Tensor):
            yield from _inner_tensors(value)


def owned_storages(module: nn.Module) -> frozenset[int]:
    """Addresses of the storages of ``module``'s parameters and buffers.

    A tensor subclass has no storage of its own; its inner tensors' storages count instead (FSDP2's
    sharded DTensor parameters: their local shards).
    """
    return frozenset(
        inner.untyped_storage().data_ptr()
        for tensor in (*module.parameters(), *module.buffers())
        for inner in _inner_tensors(tensor)
        if inner.layout is torch.strided
    )


def decide(tensor: torch.Tensor, options: OffloadOptions, owned: frozenset[int]) -> Decision:
    """Says what offloading does with ``tensor``, a tensor autograd saves for backward.

    Args:
        tensor: The saved tensor.
        options: The offload's options.
        owned: The storages of the module's parameters and buffers (:func:`owned_storages`).

    Returns:
        :attr:`Decision.COPY` when a host copy frees memory, :attr:`Decision.FLATTEN` for a traceable
        wrapper subclass (DTensor...) whose inner tensors are each decided, else why it stays.

    Raises:
        TypeError: ``tensor`` would be copied but is a tensor subclass without
            ``__tensor_flatten__``: a plain copy would drop its type.
    """
    base = tensor._base if tensor._base is not None else tensor
    if isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad):
        # FSDP1's flat-parameter views, FSDP2's sharded and unsharded parameters, an input the
        # caller keeps for its .grad.
        return Decision.PARAMETER
    if tensor.device.type == "cpu" and not options.copy_cpu_tensors:
        return Decision.ON_HOST
    if is_traceable_wrapper_subclass(tensor):
        return Decision.FLATTEN
    if tensor.layout is not torch.strided:
        return Decision.NOT_STRIDED
    storage = tensor.untyped_storage()
    if storage.data_ptr() in owned:
        return Decision.MODULE_STATE
    if storage.nbytes() < options.min_offload_bytes:
        return Decision.SMALL
    if type(tensor) is not torch.Tensor:
        raise TypeError(
            f"Offloading cannot copy a saved tensor of type {type(tensor).__qualname__}: it is not a "
            "traceable wrapper subclass (__tensor_flatten__ / __tensor_unflatten__), so a copy would "
            "lose its type. Keep the module that saves it outside the offload wrapper, or give the "
            "subclass __tensor_flatten__ and __tensor_unflatten__."
        )
    return Decision.COPY


def pins(source: torch.device, pin_memory: bool) -> bool:
    """Whether the host copy of a tensor on ``source`` is page-locked.

    Page-locked memory lets the copy back to a CUDA device run asynchronously; it is scarce, so it is
    used only when asked for and only for tensors that came from a CUDA device (never for a CPU
    tensor copied with ``copy_cpu_tensors``).

    Example:
        >>> pins(torch.device("cuda", 0), pin_memory=True), pins(torch.device("cpu"), pin_memory=True)
        (True, False)
    """
    return pin_memory and source.type == "cuda"


@dataclass(frozen=True)
class HostCopy:
    """A saved tensor copied to host memory, and the device it goes back to."""

    host: torch.Tensor
    device: torch.device
    pinned: bool


@dataclass(frozen=True)
class FlattenedCopy:
    """A traceable wrapper subclass whose inner tensors were packed one by one."""

    cls: type[torch.Tensor]
    inner: dict[str, Any]
    """Each inner attribute packed (a tensor, :class:`HostCopy` or :class:`FlattenedCopy`), or as it
    was when it is no tensor (DTensor's device mesh)."""
    context: Any
    size: torch.Size
    stride: tuple[int, ...]


Packed = torch.Tensor | HostCopy | FlattenedCopy
"""What :func:`pack_saved_tensor` returns: the tensor itself when it stays, else its copy."""


def pack_saved_tensor(tensor: torch.Tensor, options: OffloadOptions, owned: frozenset[int]) -> Packed:
    """Copies ``tensor`` to host memory where :func:`decide` says so; returns what to unpack.

    Raises:
        TypeError: See :func:`decide`.
    """
    decision = decide(tensor, options, owned)
    if decision is Decision.COPY:
        pinned = pins(tensor.device, options.pin_memory)
        host = torch.empty_like(tensor, device="cpu", pin_memory=pinned)
        host.copy_(tensor)
        return HostCopy(host, tensor.device, pinned)
    flat = _flatten(tensor) if decision is Decision.FLATTEN else None
    if flat is None:
        return tensor
    attributes, context = flat
    inner = {
        name: pack_saved_tensor(value, options, owned) if isinstance(value, torch.Tensor) else value
        for name, value in attributes.items()
    }
    if all(inner[name] is value for name, value in attributes.items()):
        return tensor  # nothing inside was copied
    return FlattenedCopy(type(tensor), inner, context, tensor.size(), tensor.stride())


def unpack_saved_tensor(packed: Packed) -> torch.Tensor:
    """The tensor backward reads: ``packed`` itself, or its copy on the device it came from.

    A copy from the CPU (``copy_cpu_tensors``) is returned as it is: backward reads the copy.
    """
    if isinstance(packed, torch.Tensor):
        return packed
    if isinstance(packed, HostCopy):
        return packed.host.to(packed.device, non_blocking=packed.pinned)
    inner = {
        name: unpack_saved_tensor(value)
        if isinstance(value, (torch.Tensor, HostCopy, FlattenedCopy))
        else value
        for name, value in packed.inner.items()
    }
    rebuilt: torch.Tensor = packed.cls.__tensor_unflatten__(  # type: ignore[attr-defined]
        inner, packed.context, packed.size, packed.stride
    )
    return rebuilt


@contextmanager
def offload_saved_tensors(
    module: nn.Module,
    *,
    pin_memory: bool = True,
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
    copy_cpu_tensors: bool = False,
) -> Iterator[None]:
    """Moves the activations that autograd saves inside this context to CPU memory.

    Args:
        module: The module running inside the context; its parameters and buffers are never copied.
        pin_memory: Copy into page-locked memory so the copy back to the accelerator can overlap
            (for tensors on a CUDA device only).
        min_offload_bytes: Saved tensors whose storage is smaller than this stay on their device.
        copy_cpu_tensors: Also copy saved tensors already in CPU memory, into separate CPU memory
            (see :attr:`OffloadOptions.copy_cpu_tensors`): for tests on machines without an accelerator.

    Raises:
        ValueError: ``min_offload_bytes`` is negative.
        TypeError: On a saved tensor of a subclass that cannot be copied (see :func:`decide`).

    Example:
        >>> block = nn.Linear(64, 64)
        >>> with offload_saved_tensors(block, pin_memory=False, copy_cpu_tensors=True):
        ...     loss = block(torch.randn(8, 64)).relu().sum()  # relu's output is copied
        >>> loss.backward()
    """
    options = OffloadOptions(pin_memory, min_offload_bytes, copy_cpu_tensors)
    # Taken when the context is entered, not when the module was wrapped: FSDP2 swaps unsharded
    # parameters in during forward.
    owned = owned_storages(module)

    def pack(tensor: torch.Tensor) -> Packed:
        return pack_saved_tensor(tensor, options, owned)

    with saved_tensors_hooks(pack, unpack_saved_tensor):
        yield
