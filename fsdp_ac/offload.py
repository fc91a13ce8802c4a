"""Activation offloading: the tensors autograd saves for backward wait in host (CPU) memory.

:func:`decide` says which tensors move; copies are synchronous, or an :class:`OffloadEngine`'s
side-stream copies into a host pool with prefetch. See docs/offload.md.
"""

from __future__ import annotations

import enum
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from fsdp_ac._compat import StorageWeakRef, is_traceable_wrapper_subclass

DEFAULT_MIN_OFFLOAD_BYTES = 1024


@dataclass(frozen=True)
class OffloadOptions:
    """What an offload copies, and how (see :func:`offload_saved_tensors` for each field).

    Raises:
        ValueError: ``min_offload_bytes`` is negative.
    """

    pin_memory: bool = True
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES
    copy_cpu_tensors: bool = False

    def __post_init__(self) -> None:
        if self.min_offload_bytes < 0:
            raise ValueError(f"min_offload_bytes must be >= 0 (bytes), got {self.min_offload_bytes}.")


class Decision(enum.Enum):
    """What offloading does with one tensor that autograd saves for backward."""

    COPY = "copied to host memory"
    FLATTEN = "a tensor subclass: each of its inner tensors is decided on its own"
    PARAMETER = "a parameter, a view of one, or another leaf that requires grad: its owner holds it"
    WEIGHT_CAST = "a cast of a parameter (autocast's bf16 weight): the weight is on the device anyway"
    MODULE_STATE = "shares its storage with a parameter or buffer of the module"
    ON_HOST = "already in CPU memory"
    SMALL = "its storage is smaller than min_offload_bytes"
    NOT_STRIDED = "a sparse or other non-strided layout, which has no plain storage to copy"


def _flatten(tensor: torch.Tensor) -> tuple[dict[str, object], Any] | None:
    if not is_traceable_wrapper_subclass(tensor):
        return None
    names, context = tensor.__tensor_flatten__()
    return {name: getattr(tensor, name) for name in names}, context


def _inner_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    flat = _flatten(tensor)
    if flat is None:
        yield tensor
        return
    for value in flat[0].values():
        if isinstance(value, torch.Tensor):
            yield from _inner_tensors(value)


def owned_storages(module: nn.Module) -> frozenset[int]:
    """The storage addresses of ``module``'s parameters and buffers (of a subclass: its inner tensors')."""
    return frozenset(
        inner.untyped_storage().data_ptr()
        for tensor in (*module.parameters(), *module.buffers())
        for inner in _inner_tensors(tensor)
        if inner.layout is torch.strided
    )


def decide(tensor: torch.Tensor, options: OffloadOptions, owned: frozenset[int]) -> Decision:
    """Says what offloading does with ``tensor``, a tensor autograd saves for backward.

    ``owned`` holds the storages of the module's parameters and buffers (:func:`owned_storages`).

    Raises:
        TypeError: ``tensor`` would be copied but is a subclass without ``__tensor_flatten__``.
    """
    base = tensor._base if tensor._base is not None else tensor
    if isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad):
        # FSDP1's flat-parameter views, FSDP2's sharded and unsharded parameters, an input the
        # caller keeps for its .grad.
        return Decision.PARAMETER
    # One cast of a leaf that requires grad (its AccumulateGrad):
    cast = base.grad_fn
    if (
        cast is not None
        and cast.name() == "ToCopyBackward0"
        and hasattr(cast.next_functions[0][0], "variable")
    ):
        return Decision.WEIGHT_CAST
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
            "traceable wrapper subclass, so a copy would lose its type. Keep the module that saves it "
            "outside the offload wrapper, or give the subclass __tensor_flatten__ and __tensor_unflatten__."
        )
    return Decision.COPY


def pins(source: torch.device, pin_memory: bool) -> bool:
    """Whether a host copy of a tensor on ``source`` is page-locked: when asked, from CUDA only."""
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
    inner: dict[str, Any]  # each inner attribute, packed where it is a tensor
    context: Any
    size: torch.Size
    stride: tuple[int, ...]


@dataclass(eq=False, repr=False, slots=True, weakref_slot=True)
class Offloaded:
    """An :class:`OffloadEngine`'s handle on one saved tensor it copied, held by autograd."""

    engine: OffloadEngine
    copy: _Copy
    view: tuple[torch.Size, tuple[int, ...], int]  # the original's size, stride and storage offset
    host_view: tuple[torch.Size, tuple[int, ...], int]  # the same in the flat copy


Packed = torch.Tensor | HostCopy | FlattenedCopy | Offloaded


def copy_to_host(tensor: torch.Tensor, options: OffloadOptions) -> HostCopy:
    """Copies ``tensor`` into new host memory, synchronously on the current stream."""
    pinned = pins(tensor.device, options.pin_memory)
    host = torch.empty_like(tensor, device="cpu", pin_memory=pinned)
    host.copy_(tensor)
    return HostCopy(host, tensor.device, pinned)


def pack_saved_tensor(
    tensor: torch.Tensor,
    options: OffloadOptions,
    owned: frozenset[int],
    copy: Callable[[torch.Tensor], Packed] | None = None,
) -> Packed:
    """Copies ``tensor`` to host memory where :func:`decide` says so; returns what to unpack.

    Args:
        tensor: The saved tensor.
        options: The offload's options.
        owned: See :func:`decide`.
        copy: Offloads one plain tensor to copy (default :func:`copy_to_host`); may return it to keep it.

    Raises:
        TypeError: See :func:`decide`.
        RuntimeError: Under CUDA graph capture.
    """
    decision = decide(tensor, options, owned)
    if decision is Decision.COPY:
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "Offloading cannot copy a saved tensor during CUDA graph capture (host copies are not "
                "capturable). Keep offload wrappers out of the captured region."
            )
        return copy_to_host(tensor, options) if copy is None else copy(tensor)
    flat = _flatten(tensor) if decision is Decision.FLATTEN else None
    if flat is None:
        return tensor
    attributes, context = flat
    inner = {
        name: pack_saved_tensor(value, options, owned, copy) if isinstance(value, torch.Tensor) else value
        for name, value in attributes.items()
    }
    if all(inner[name] is value for name, value in attributes.items()):
        return tensor  # nothing inside was copied
    return FlattenedCopy(type(tensor), inner, context, tensor.size(), tensor.stride())


def unpack_saved_tensor(packed: Packed) -> torch.Tensor:
    """The tensor backward reads: ``packed`` itself, or its copy on the device it came from."""
    if isinstance(packed, torch.Tensor):
        return packed
    if isinstance(packed, HostCopy):
        return packed.host.to(packed.device, non_blocking=packed.pinned)
    if isinstance(packed, Offloaded):
        return packed.engine.load(packed)
    inner = {name: unpack_saved_tensor(v) if isinstance(v, Packed) else v for name, v in packed.inner.items()}
    rebuilt: torch.Tensor = packed.cls.__tensor_unflatten__(  # type: ignore[attr-defined]
        inner, packed.context, packed.size, packed.stride
    )
    return rebuilt


# --- the asynchronous engine -----------------------------------------------------------------------

Event = object  # a point on a stream another stream can wait for (a torch.cuda.Event)


@dataclass(frozen=True)
class Operation:
    """One operation an engine's :class:`Transfers` ran (docs/offload.md, "The CPU test mode")."""

    kind: str  # "to_host", "to_device", "wait" (for a reload) or "release" (waits for a copy)
    block: int  # the block's position in forward
    position: int  # the copy's position in its block


class Transfers(Protocol):
    """The copies an :class:`OffloadEngine` issues between one device and host memory, in stream order."""

    def host_buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """A new flat ``uint8`` host buffer."""
        ...

    def copy(
        self, source: torch.Tensor, target: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        """Copies ``source`` into ``target`` after the compute stream's work so far and ``after``."""
        ...

    def wait(self, event: Event, label: Operation) -> None:
        """Makes the compute stream wait for ``event`` before the work queued after this call."""
        ...


class CudaTransfers:
    """Copies on one side stream of a CUDA device, ordered against the (current) compute stream by events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def host_buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """A flat buffer, page-locked when ``pinned``."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def copy(
        self, source: torch.Tensor, target: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        """Copies on the side stream after the compute stream's work so far and ``after``."""
        # Waiting for the compute stream: the source is written there, and a reload target's memory
        # may still be read there by work queued before it was freed.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if after is not None:
            self.stream.wait_event(after)  # type: ignore[arg-type]
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)
        return self.stream.record_event()

    def wait(self, event: Event, label: Operation) -> None:
        """Makes the current stream wait for ``event``."""
        torch.cuda.current_stream(self.device).wait_event(event)  # type: ignore[arg-type]


class SynchronousTransfers:
    """The CPU test mode's :class:`CudaTransfers`: copies at once, and records each copy and wait."""

    def __init__(self) -> None:
        self.operations: list[Operation] = []

    def host_buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """A flat buffer in (pageable) CPU memory."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy(
        self, source: torch.Tensor, target: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        """Copies now; the event is the label."""
        target.copy_(source)
        self.operations.append(label)
        return label

    def wait(self, event: Event, label: Operation) -> None:
        """Records the wait."""
        self.operations.append(label)


def host_bytes(nbytes: int, pinned: bool) -> int:
    """The host memory a buffer of ``nbytes`` takes: the pinned allocator rounds up to a power of two."""
    return 1 << max(nbytes - 1, 0).bit_length() if pinned else nbytes


@dataclass(eq=False, repr=False)
class _Buffer:
    tensor: torch.Tensor  # flat uint8, host_bytes long
    pinned: bool
    ready: Event | None = None  # the last copy that used it
    step: int = 0  # the last step that took it


class HostPool:
    """Host buffers reused across steps, keyed by size (:func:`host_bytes`) and pinning.

    ``max_bytes`` caps what it holds, in use or free (docs/offload.md, "The pool").
    """

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0  # in use or free
        self.in_use_bytes = 0
        self.allocations = 0
        self.step = 0
        self._free: dict[tuple[int, bool], list[_Buffer]] = {}

    def acquire(self, nbytes: int, pinned: bool, transfers: Transfers) -> _Buffer | None:
        """A buffer that holds ``nbytes``: a free one, else a new one; None past ``max_bytes``."""
        size = host_bytes(nbytes, pinned)
        free = self._free.get((size, pinned))
        if free:
            buffer = free.pop()
        else:
            self._drop(lambda buffer: self.max_bytes is not None and self.bytes + size > self.max_bytes)
            if self.max_bytes is not None and self.bytes + size > self.max_bytes:
                return None
            buffer = _Buffer(transfers.host_buffer(size, pinned), pinned)
            self.bytes += size
            self.allocations += 1
        buffer.step = self.step
        self.in_use_bytes += size
        return buffer

    def release(self, buffer: _Buffer, ready: Event | None) -> None:
        """Takes ``buffer`` back; the next copy into it waits for ``ready`` (its last copy)."""
        buffer.ready = ready
        self.in_use_bytes -= buffer.tensor.numel()
        self._free.setdefault((buffer.tensor.numel(), buffer.pinned), []).append(buffer)

    def new_step(self) -> None:
        """Frees the free buffers the step that ends did not take, and starts the next one."""
        self._drop(lambda buffer: buffer.step < self.step)
        self.step += 1

    def _drop(self, condition: Callable[[_Buffer], bool]) -> None:
        # Safe while a reload still reads the buffer: the pinned allocator reuses a block only after
        # the copies recorded on it (and pageable copies are synchronous).
        for free in self._free.values():
            for buffer in list(free):
                if condition(buffer):  # checked as buffers go: making room drops only what it needs
                    free.remove(buffer)
                    self.bytes -= buffer.tensor.numel()


@dataclass(eq=False, repr=False)
class _Block:
    """One call of an offload wrapper."""

    index: int
    copies: list[_Copy] = field(default_factory=list)
    storages: dict[int, _Copy] = field(default_factory=dict)  # span copies by storage address
    closed: bool = False
    reloading: bool = False


@dataclass(eq=False, repr=False)
class _Copy:
    """One host copy: a saved tensor compacted, or a span of a storage that saved views read."""

    block: _Block
    position: int
    transfers: Transfers
    device: torch.device
    buffer: _Buffer
    host: torch.Tensor  # flat, in the tensor's dtype
    copied: Event
    source: torch.Tensor | None  # the original, until the compute stream has waited for `copied`
    span: tuple[int, int] | None  # the storage elements copied; None: compacted
    storage: StorageWeakRef | None
    version: int
    users: int = 0
    reads: int = 0
    reload: tuple[torch.Tensor, Event] | None = None
    last: Event | None = None  # the last copy that used the buffer


class OffloadEngine:
    """Offloads saved activations asynchronously: side-stream copies, a host pool, prefetch.

    One engine serves the offload wrappers of a model (``offload_wrapper(block, engine=engine)``);
    each wrapper call is a block (docs/offload.md, "The engine").

    Args:
        max_host_bytes: The most host memory the pool holds (:func:`host_bytes`); None for no limit.
        on_cap: ``"keep"`` (stay on the device, warned once) or ``"raise"`` past the cap.
        prefetch_blocks: How many blocks ahead backward reloads (0: each block when it is read).

    Raises:
        ValueError: A negative ``max_host_bytes`` or ``prefetch_blocks``, or an unknown ``on_cap``.

    Example:
        >>> engine = OffloadEngine(max_host_bytes=2**30)
        >>> block = nn.Linear(64, 64)
        >>> with engine.block(block, OffloadOptions(copy_cpu_tensors=True)):
        ...     loss = block(torch.randn(8, 64)).relu().sum()
        >>> loss.backward()
        >>> engine.pool.allocations, engine.pool.in_use_bytes
        (2, 0)
    """

    def __init__(
        self, *, max_host_bytes: int | None = None, on_cap: str = "keep", prefetch_blocks: int = 1
    ) -> None:
        if max_host_bytes is not None and max_host_bytes < 0:
            raise ValueError(f"max_host_bytes must be None or >= 0, got {max_host_bytes}.")
        if on_cap not in ("keep", "raise"):
            raise ValueError(f'on_cap must be "keep" or "raise", got {on_cap!r}.')
        if prefetch_blocks < 0:
            raise ValueError(f"prefetch_blocks must be >= 0, got {prefetch_blocks}.")
        self.on_cap = on_cap
        self.prefetch_blocks = prefetch_blocks
        self.pool = HostPool(max_host_bytes)
        self.kept_for_cap = 0
        self.cpu_transfers: Transfers = SynchronousTransfers()
        self._cuda: dict[torch.device, CudaTransfers] = {}
        self._blocks: list[_Block] = []
        self._stash: deque[_Block] = deque()
        self._next_index = 0
        # Backward may run on autograd's device threads, and handles die there.
        self._lock = threading.RLock()

    def __reduce__(self) -> tuple[Any, ...]:
        """Copies and pickles as a new engine with the same settings (its own pool and cap)."""
        engine = partial(OffloadEngine, max_host_bytes=self.pool.max_bytes, on_cap=self.on_cap)
        return partial(engine, prefetch_blocks=self.prefetch_blocks), ()

    @contextmanager
    def block(self, module: nn.Module, options: OffloadOptions) -> Iterator[None]:
        """Offloads, as one block, the tensors autograd saves inside this context (``module``'s own stay).

        Raises:
            TypeError: See :func:`decide`.
            RuntimeError: Past ``max_host_bytes`` with ``on_cap="raise"``, or under graph capture.
        """
        owned = owned_storages(module)
        with self._lock:
            if not self._blocks:  # a new step
                self._next_index = 0
                self.pool.new_step()
            block = _Block(self._next_index)
            self._next_index += 1
            self._blocks.append(block)

        def pack(tensor: torch.Tensor) -> Packed:
            return pack_saved_tensor(tensor, options, owned, lambda t: self._offload(block, t, options))

        try:
            with saved_tensors_hooks(pack, unpack_saved_tensor):
                yield
        finally:
            with self._lock:
                block.closed = True
                if not block.copies:
                    self._blocks.remove(block)
                self._stash.append(block)
                while len(self._stash) > 1:
                    held = [copy for copy in self._stash.popleft().copies if copy.source is not None]
                    # A side stream runs in order: a wait for its last copy covers the copies before.
                    for copy in {id(copy.transfers): copy for copy in held}.values():
                        self._unstash(copy)
                    for copy in held:
                        copy.source = None

    def _transfers(self, device: torch.device) -> Transfers | None:
        if device.type == "cpu":
            return self.cpu_transfers
        if device.type != "cuda":
            return None
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._cuda:
            self._cuda[device] = CudaTransfers(device)
        return self._cuda[device]

    def _offload(self, block: _Block, tensor: torch.Tensor, options: OffloadOptions) -> Packed:
        transfers = self._transfers(tensor.device)
        if transfers is None:
            return copy_to_host(tensor, options)  # another accelerator: the synchronous copy
        offset, numel, itemsize = int(tensor.storage_offset()), tensor.numel(), tensor.element_size()
        end = offset + 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
        end = end if numel else offset
        # A tensor with gaps is compacted; any other (dense, expanded, overlapping) is copied as the
        # span of storage it reads, which no view of that span then copies again.
        span = None if end - offset > numel else (offset, end)
        address = tensor.untyped_storage().data_ptr()
        with self._lock:
            copy = block.storages.get(address) if span else None
            if copy is None or not _holds(copy, tensor, offset, end):
                length = numel if span is None else end - offset
                buffer = self.pool.acquire(
                    length * itemsize, pins(tensor.device, options.pin_memory), transfers
                )
                if buffer is None:
                    return self._keep_for_cap(tensor)
                host = buffer.tensor[: length * itemsize].view(tensor.dtype)
                label = Operation("to_host", block.index, len(block.copies))
                source = tensor if span is None else tensor.as_strided((length,), (1,), offset)
                copied = transfers.copy(source, host.view(source.size()), buffer.ready, label)
                storage = StorageWeakRef(tensor.untyped_storage()) if span else None
                copy = _Copy(
                    block, label.position, transfers, tensor.device, buffer, host, copied, tensor, span,
                    storage, tensor._version, last=copied,
                )  # fmt: skip
                block.copies.append(copy)
                if span is not None:
                    block.storages[address] = copy
            copy.users += 1
        if copy.span is None:
            host_view = (tensor.size(), torch.empty(tensor.size(), device="meta").stride(), 0)
        else:
            host_view = (tensor.size(), tensor.stride(), offset - copy.span[0])
        handle = Offloaded(self, copy, (tensor.size(), tensor.stride(), offset), host_view)
        weakref.finalize(handle, self._release, copy).atexit = False
        return handle

    def _keep_for_cap(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        message = (
            f"Offloading a saved tensor of {nbytes} bytes would take the engine's host memory past "
            f"max_host_bytes={self.pool.max_bytes} ({self.pool.in_use_bytes} bytes in use)"
        )
        if self.on_cap == "raise":
            raise RuntimeError(
                f"{message}. Raise max_host_bytes, offload fewer blocks, or pass on_cap='keep'."
            )
        if self.kept_for_cap == 0:
            warnings.warn(
                f"{message}: it stays on {tensor.device}, as will others past the cap (said once). "
                "Raise max_host_bytes to offload them.",
                ResourceWarning,
                stacklevel=2,
            )
        self.kept_for_cap += 1
        return tensor

    def _unstash(self, copy: _Copy) -> None:
        # The compute stream waits for the copy first: the memory goes back to the allocator only
        # for work queued after the copy.
        if copy.source is not None:
            copy.transfers.wait(copy.copied, Operation("release", copy.block.index, copy.position))
            copy.source = None

    def _reload(self, copy: _Copy) -> tuple[torch.Tensor, Event]:
        # Allocated on the compute stream, so its free follows compute-stream order.
        target = torch.empty(copy.host.numel(), dtype=copy.host.dtype, device=copy.device)
        label = Operation("to_device", copy.block.index, copy.position)
        copy.last = copy.transfers.copy(copy.host, target, copy.last, label)
        return target, copy.last

    def _prefetch(self, block: _Block) -> None:
        at = self._blocks.index(block)
        for earlier in reversed(self._blocks[max(0, at - self.prefetch_blocks) : at + 1]):
            if not earlier.reloading:
                earlier.reloading = True
                for copy in reversed(earlier.copies):  # backward reads the last saved first
                    if copy.source is None and copy.reload is None:
                        copy.reload = self._reload(copy)

    def load(self, handle: Offloaded) -> torch.Tensor:
        """The tensor ``handle`` stands for, on its device: for backward (the unpack hook)."""
        copy = handle.copy
        with self._lock:
            self._prefetch(copy.block)
            if copy.source is not None:  # in the stash
                return copy.source.as_strided(*handle.view)
            if copy.reload is None:
                copy.reload = self._reload(copy)
            target, event = copy.reload
            copy.transfers.wait(event, Operation("wait", copy.block.index, copy.position))
            copy.reads += 1
            if copy.reads >= copy.users:  # each handle read it: a second backward reloads again
                copy.reload, copy.reads = None, 0
        return target.as_strided(*handle.host_view)

    def _release(self, copy: _Copy) -> None:
        """Takes back the buffer of a copy that autograd no longer holds a handle of."""
        with self._lock:
            copy.users -= 1
            if copy.users:
                return
            self._unstash(copy)
            if copy.reload is not None:  # a reload nobody read (the graph was freed mid-backward)
                copy.transfers.wait(copy.reload[1], Operation("release", copy.block.index, copy.position))
                copy.reload = None
            self.pool.release(copy.buffer, copy.last)
            block = copy.block
            block.copies.remove(copy)
            if block.closed and not block.copies and block in self._blocks:
                self._blocks.remove(block)


def _holds(copy: _Copy, tensor: torch.Tensor, start: int, end: int) -> bool:
    """Whether ``copy`` has what ``tensor`` reads: the same live storage, unchanged, and its span."""
    return (
        copy.span is not None
        and copy.storage is not None
        and not copy.storage.expired()
        and copy.version == tensor._version
        and copy.host.dtype == tensor.dtype
        and copy.span[0] <= start
        and end <= copy.span[1]
    )


@contextmanager
def offload_saved_tensors(
    module: nn.Module,
    *,
    pin_memory: bool = True,
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
    copy_cpu_tensors: bool = False,
    engine: OffloadEngine | None = None,
) -> Iterator[None]:
    """Moves the activations that autograd saves inside this context to CPU memory.

    Args:
        module: The module running inside the context; its parameters and buffers are never copied.
        pin_memory: Copy into page-locked memory so reloads can overlap (tensors on CUDA only).
        min_offload_bytes: Saved tensors whose storage is smaller than this stay on their device.
        copy_cpu_tensors: Also copy tensors already in CPU memory: runs the path without an accelerator.
        engine: The :class:`OffloadEngine` that copies, or None for synchronous copies on the current stream.

    Raises:
        ValueError: ``min_offload_bytes`` is negative.
        TypeError: On a saved tensor of a subclass that cannot be copied (see :func:`decide`).
        RuntimeError: See :meth:`OffloadEngine.block`.

    Example:
        >>> block = nn.Linear(64, 64)
        >>> with offload_saved_tensors(block, pin_memory=False, copy_cpu_tensors=True):
        ...     loss = block(torch.randn(8, 64)).relu().sum()  # relu's output is copied
        >>> loss.backward()
    """
    options = OffloadOptions(pin_memory, min_offload_bytes, copy_cpu_tensors)
    if engine is not None:
        with engine.block(module, options):
            yield
        return
    # Taken on entry, not at wrapping: FSDP2 swaps unsharded parameters in during forward.
    owned = owned_storages(module)

    def pack(tensor: torch.Tensor) -> Packed:
        return pack_saved_tensor(tensor, options, owned)

    with saved_tensors_hooks(pack, unpack_saved_tensor):
        yield
