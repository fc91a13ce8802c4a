"""Activation offloading: autograd keeps the tensors it saves for backward in host (CPU) memory.

Only tensors that offloading actually frees are moved: parameters, buffers and their views stay where
they are (the model holds them anyway, so a copy would only add memory), as do tensors already on the
CPU and tensors smaller than ``min_offload_bytes`` (the copy costs more than it frees). Tensor
subclasses such as DTensor are offloaded through their inner tensors (``__tensor_flatten__``), so a
copy has the local shape and is rebuilt around the same spec on the way back.

The pieces are small functions that both ways of copying share: :func:`decide` says what happens to
one saved tensor, :func:`pins` whether its host copy is page-locked, and :func:`pack_saved_tensor` /
:func:`unpack_saved_tensor` are the pair of ``saved_tensors_hooks`` that :func:`offload_saved_tensors`
installs. By default each copy is synchronous (:func:`copy_to_host`); an :class:`OffloadEngine` copies
on a side stream into a reused host pool and prefetches in backward (docs/offload.md).

On a machine without an accelerator every activation already lives on the CPU, so offloading has
nothing to move. ``copy_cpu_tensors=True`` copies those too, into separate CPU memory that plays the
host's part: it frees nothing, but runs every decision and every copy for real, which is how the
test suite checks offloading on CPU.
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
from typing import Any, Protocol

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from fsdp_ac._compat import is_traceable_wrapper_subclass

__all__ = [
    "DEFAULT_MIN_OFFLOAD_BYTES",
    "CudaTransfers",
    "Decision",
    "FlattenedCopy",
    "HostCopy",
    "HostPool",
    "OffloadEngine",
    "OffloadOptions",
    "Offloaded",
    "Operation",
    "Packed",
    "SynchronousTransfers",
    "Transfers",
    "copy_to_host",
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


class Offloaded:
    """An :class:`OffloadEngine`'s handle on one saved tensor it copies to host memory.

    Autograd holds it in place of the tensor; when autograd lets it go (backward has consumed the
    tensor, or the graph was freed), the engine takes its host buffer back into its pool.
    """

    __slots__ = ("__weakref__", "engine", "entry")

    def __init__(self, engine: OffloadEngine, entry: _Entry) -> None:
        self.engine = engine
        self.entry = entry


Packed = torch.Tensor | HostCopy | FlattenedCopy | Offloaded
"""What :func:`pack_saved_tensor` returns: the tensor itself when it stays, else its copy or an
engine's handle on it."""


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
        owned: The storages of the module's parameters and buffers (:func:`owned_storages`).
        copy: Offloads one plain tensor that :func:`decide` says to copy (an engine's asynchronous
            copy); by default :func:`copy_to_host`. It may return the tensor itself to keep it.

    Raises:
        TypeError: See :func:`decide`.
    """
    decision = decide(tensor, options, owned)
    if decision is Decision.COPY:
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
    """The tensor backward reads: ``packed`` itself, or its copy on the device it came from.

    A copy from the CPU (``copy_cpu_tensors``) is returned as it is: backward reads the copy.
    """
    if isinstance(packed, torch.Tensor):
        return packed
    if isinstance(packed, HostCopy):
        return packed.host.to(packed.device, non_blocking=packed.pinned)
    if isinstance(packed, Offloaded):
        return packed.engine.load(packed)
    inner = {
        name: unpack_saved_tensor(value)
        if isinstance(value, (torch.Tensor, HostCopy, FlattenedCopy, Offloaded))
        else value
        for name, value in packed.inner.items()
    }
    rebuilt: torch.Tensor = packed.cls.__tensor_unflatten__(  # type: ignore[attr-defined]
        inner, packed.context, packed.size, packed.stride
    )
    return rebuilt


# --- the asynchronous engine -----------------------------------------------------------------------


class Event(Protocol):
    """What the engine needs of a CUDA event: whether the work before it is done, or waiting for it."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass(frozen=True)
class Operation:
    """One operation that :class:`SynchronousTransfers` ran, in the order it ran them."""

    kind: str
    """``"to_host"`` (a saved tensor copied into a host buffer), ``"to_device"`` (a reload
    started) or ``"wait"`` (the compute stream waits for a reload, just before backward reads it)."""
    block: int
    """The block's position in the forward pass that saved the tensor (0 is the first block)."""
    position: int
    """The tensor's position among the tensors its block copied."""


class Transfers(Protocol):
    """The copies an :class:`OffloadEngine` issues between one device and host memory.

    :class:`CudaTransfers` runs them on a side stream; :class:`SynchronousTransfers` runs them at
    once on the CPU and records them, for tests without an accelerator.
    """

    def host_buffer(self, numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        """A new flat host buffer of ``numel`` elements."""
        ...

    def to_host(
        self, source: torch.Tensor, host: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        """Copies ``source`` into ``host`` once the compute stream's work so far and ``after`` are done."""
        ...

    def to_device(
        self, host: torch.Tensor, target: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        """Copies ``host`` into ``target`` once the compute stream's work so far and ``after`` are done."""
        ...

    def wait(self, event: Event, label: Operation) -> None:
        """Makes the compute stream wait for ``event`` before the work queued after this call."""
        ...


class CudaTransfers:
    """Copies on one side stream of a CUDA device, ordered against the compute stream by events.

    The compute stream is the current stream when a method is called (autograd runs backward on
    the streams forward used). Nothing calls ``record_stream``: the engine keeps each source alive
    until its copy's event is done, and allocates reload targets on the compute stream, so the
    caching allocator never hands out memory a copy still reads or writes.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def host_buffer(self, numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        """A flat host buffer, page-locked when ``pinned``."""
        return torch.empty(numel, dtype=dtype, pin_memory=pinned)

    def _copy(self, source: torch.Tensor, target: torch.Tensor, after: Event | None) -> Event:
        # The side stream first waits for the compute stream: the source is written there, and a
        # reload target's memory may still be read there by work queued before it was freed.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if after is not None:
            self.stream.wait_event(after)  # type: ignore[arg-type]
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)
        return self.stream.record_event()

    def to_host(
        self, source: torch.Tensor, host: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        """Copies ``source`` into the host buffer ``host`` on the side stream."""
        return self._copy(source, host, after)

    def to_device(
        self, host: torch.Tensor, target: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        """Copies ``host`` into ``target`` (allocated on the compute stream) on the side stream."""
        return self._copy(host, target, after)

    def wait(self, event: Event, label: Operation) -> None:
        """Makes the current stream wait for ``event``."""
        torch.cuda.current_stream(self.device).wait_event(event)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Done:
    """The event of a copy that already ran."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class SynchronousTransfers:
    """The CPU test mode's stand-in for :class:`CudaTransfers`: copies at once, and records them.

    ``operations`` lists every copy and every wait in the order the engine issued them, so tests
    can check what a CUDA run would have queued on its streams.
    """

    def __init__(self) -> None:
        self.operations: list[Operation] = []

    def host_buffer(self, numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        """A flat buffer in (pageable) CPU memory."""
        return torch.empty(numel, dtype=dtype)

    def _copy(self, source: torch.Tensor, target: torch.Tensor, label: Operation) -> Event:
        target.copy_(source)
        self.operations.append(label)
        return _Done()

    def to_host(
        self, source: torch.Tensor, host: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        """Copies now."""
        return self._copy(source, host, label)

    def to_device(
        self, host: torch.Tensor, target: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        """Copies now."""
        return self._copy(host, target, label)

    def wait(self, event: Event, label: Operation) -> None:
        """Records the wait."""
        self.operations.append(label)


@dataclass
class _Buffer:
    """A flat host buffer of the pool, and the event of the last copy that used it."""

    tensor: torch.Tensor
    pinned: bool
    ready: Event | None = None


class HostPool:
    """Host buffers reused across steps, keyed by element count, dtype and pinning.

    Once warm, a training step allocates nothing: every buffer a step takes comes back when
    backward has consumed its tensor. ``max_bytes`` caps the host memory the pool holds, in use or
    free; a free buffer of another size is given up to make room under it.
    """

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        """Host memory the pool holds, in use or free."""
        self.in_use_bytes = 0
        """Host memory that holds saved tensors now."""
        self.allocations = 0
        """How many buffers the pool ever allocated."""
        self._free: dict[tuple[int, torch.dtype, bool], list[_Buffer]] = {}

    def acquire(self, numel: int, dtype: torch.dtype, pinned: bool, transfers: Transfers) -> _Buffer | None:
        """A buffer of ``numel`` elements: a free one, else a new one; None past ``max_bytes``."""
        nbytes = numel * dtype.itemsize
        free = self._free.get((numel, dtype, pinned))
        if free:
            buffer = free.pop()
        else:
            if not self._make_room(nbytes):
                return None
            buffer = _Buffer(transfers.host_buffer(numel, dtype, pinned), pinned)
            self.bytes += nbytes
            self.allocations += 1
        self.in_use_bytes += nbytes
        return buffer

    def release(self, buffer: _Buffer, ready: Event | None) -> None:
        """Takes ``buffer`` back; it is reused once ``ready`` (its last copy) is done."""
        buffer.ready = ready
        tensor = buffer.tensor
        self.in_use_bytes -= tensor.numel() * tensor.dtype.itemsize
        self._free.setdefault((tensor.numel(), tensor.dtype, buffer.pinned), []).append(buffer)

    def _make_room(self, nbytes: int) -> bool:
        if self.max_bytes is None:
            return True
        for free in self._free.values():
            while free and self.bytes + nbytes > self.max_bytes:
                if free[-1].ready is not None and not free[-1].ready.query():
                    break  # a reload still reads it
                dropped = free.pop().tensor
                self.bytes -= dropped.numel() * dropped.dtype.itemsize
        return self.bytes + nbytes <= self.max_bytes


@dataclass
class _Block:
    """One call of an offload wrapper: the tensors it saved, in the order forward saved them."""

    index: int
    entries: list[_Entry] = field(default_factory=list)
    closed: bool = False
    reloading: bool = False


@dataclass
class _Entry:
    """One saved tensor the engine copied: where it lives now, and the events that order it."""

    block: _Block
    position: int
    transfers: Transfers
    device: torch.device
    size: torch.Size
    stride: tuple[int, ...]
    buffer: _Buffer
    host: torch.Tensor
    """The buffer seen with the tensor's shape and strides."""
    copied: Event
    """The copy to the host."""
    source: torch.Tensor | None
    """The original, until the engine sees its copy done: backward may read it meanwhile."""
    reload: tuple[torch.Tensor, Event] | None = None
    last: Event | None = None
    """The last copy that used the buffer."""


class OffloadEngine:
    """Offloads saved activations asynchronously: side-stream copies, a host pool, prefetch.

    Share one engine between the offload wrappers of a model (``offload_wrapper(block,
    engine=engine)``); each wrapper call is a block. In forward, each saved tensor that
    :func:`decide` says to copy is copied on a side stream into a pooled host buffer, and the
    original is kept until the engine sees the copy's event done (at the next pack, block boundary
    or unpack), so its memory is never reused early. In backward, the first tensor a block reads
    starts the reload of that block (if it was not prefetched) and of the ``prefetch_blocks``
    blocks that ran before it in forward; the compute stream waits for a tensor's reload just before
    backward reads it. A tensor whose copy is not seen done yet is read in place.

    Args:
        max_host_bytes: The most host memory the engine's pool holds; None for no limit. Past it
            tensors stay on their device (with one warning), or the engine raises.
        on_cap: ``"keep"`` (stay on the device) or ``"raise"`` when a copy would pass the cap.
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
        """How many tensors stayed on their device because of ``max_host_bytes``."""
        self.cpu_transfers = SynchronousTransfers()
        """The CPU test mode's transfers; its ``operations`` record what the engine did on CPU."""
        self._cuda: dict[torch.device, CudaTransfers] = {}
        self._blocks: list[_Block] = []
        self._next_index = 0
        self._in_flight: deque[tuple[Event, torch.Tensor, _Entry]] = deque()
        # Backward may run on autograd's device threads, and handles die there.
        self._lock = threading.RLock()

    def __reduce__(self) -> tuple[Any, ...]:
        """Copies and pickles as a new engine with the same settings (its own pool and cap)."""
        return _engine_with, (self.pool.max_bytes, self.on_cap, self.prefetch_blocks)

    @contextmanager
    def block(self, module: nn.Module, options: OffloadOptions) -> Iterator[None]:
        """Offloads, as one block, the tensors autograd saves inside this context.

        Args:
            module: The module running inside the context; its parameters and buffers stay.
            options: Which tensors are copied (:func:`decide`) and whether into pinned memory.

        Raises:
            TypeError: See :func:`decide`.
            RuntimeError: A copy would pass ``max_host_bytes`` and ``on_cap="raise"``.
        """
        owned = owned_storages(module)
        with self._lock:
            self._poll()
            block = _Block(self._next_index)
            self._next_index += 1
            self._blocks.append(block)

        def copy(tensor: torch.Tensor) -> Packed:
            return self._offload(block, tensor, options)

        def pack(tensor: torch.Tensor) -> Packed:
            return pack_saved_tensor(tensor, options, owned, copy)

        try:
            with saved_tensors_hooks(pack, unpack_saved_tensor):
                yield
        finally:
            with self._lock:
                block.closed = True
                self._poll()
                if not block.entries:
                    self._blocks.remove(block)

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
        with self._lock:
            self._poll()
            buffer = self.pool.acquire(
                tensor.numel(), tensor.dtype, pins(tensor.device, options.pin_memory), transfers
            )
            if buffer is None:
                return self._keep_for_cap(tensor)
            # A dense tensor keeps its strides (the copy is one block of memory), another one is
            # stored contiguously, as torch.empty_like would.
            stride = torch.empty_like(tensor, device="meta").stride()
            host = buffer.tensor.as_strided(tensor.size(), stride)
            label = Operation("to_host", block.index, len(block.entries))
            copied = transfers.to_host(tensor, host, buffer.ready, label)
            entry = _Entry(
                block, label.position, transfers, tensor.device, tensor.size(), stride,
                buffer, host, copied, source=tensor, last=copied,
            )  # fmt: skip
            block.entries.append(entry)
            self._in_flight.append((copied, tensor, entry))
        handle = Offloaded(self, entry)
        weakref.finalize(handle, self._release, entry).atexit = False
        return handle

    def _keep_for_cap(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        message = (
            f"Offloading a saved tensor of {nbytes} bytes would take the engine's host memory past "
            f"max_host_bytes={self.pool.max_bytes} ({self.pool.in_use_bytes} bytes in use)"
        )
        if self.on_cap == "raise":
            raise RuntimeError(
                f"{message}. Raise max_host_bytes, offload fewer blocks, or pass on_cap='keep' to "
                "keep such tensors on their device."
            )
        if self.kept_for_cap == 0:
            warnings.warn(
                f"{message}: it stays on {tensor.device}, as will any other tensor past the cap "
                "(said once). Raise max_host_bytes to offload them.",
                ResourceWarning,
                stacklevel=2,
            )
        self.kept_for_cap += 1
        return tensor

    def _poll(self) -> None:
        """Lets go of the originals whose copy to the host is done."""
        while self._in_flight and self._in_flight[0][0].query():
            _, _, entry = self._in_flight.popleft()
            entry.source = None

    def _reload(self, entry: _Entry) -> tuple[torch.Tensor, Event]:
        target = torch.empty_strided(entry.size, entry.stride, dtype=entry.host.dtype, device=entry.device)
        label = Operation("to_device", entry.block.index, entry.position)
        event = entry.transfers.to_device(entry.host, target, entry.last, label)
        entry.last = event
        return target, event

    def _start_reload(self, block: _Block) -> None:
        if block.reloading:
            return
        block.reloading = True
        for entry in list(block.entries):
            if entry.source is None and entry.reload is None:
                entry.reload = self._reload(entry)

    def load(self, handle: Offloaded) -> torch.Tensor:
        """The tensor ``handle`` stands for, on its device: for backward (the unpack hook)."""
        entry = handle.entry
        with self._lock:
            self._poll()
            block = entry.block
            self._start_reload(block)
            if entry.source is not None:
                source, entry.source = entry.source, None
                loaded = source
            else:
                target, event = entry.reload if entry.reload is not None else self._reload(entry)
                entry.reload = None
                entry.transfers.wait(event, Operation("wait", block.index, entry.position))
                loaded = target
            if block in self._blocks:
                at = self._blocks.index(block)
                for earlier in self._blocks[max(0, at - self.prefetch_blocks) : at]:
                    self._start_reload(earlier)
        return loaded

    def _release(self, entry: _Entry) -> None:
        """Takes the buffer of a tensor autograd no longer holds back into the pool."""
        with self._lock:
            entry.source = None
            if entry.reload is not None:
                # A reload nobody read (the graph was freed mid-backward): its target may be freed
                # only after the copy into it, whatever stream this thread is on.
                entry.reload[1].synchronize()
                entry.reload = None
            self.pool.release(entry.buffer, entry.last)
            block = entry.block
            block.entries.remove(entry)
            if block.closed and not block.entries and block in self._blocks:
                self._blocks.remove(block)
                if not self._blocks:
                    self._next_index = 0  # the next forward is a new step


def _engine_with(max_host_bytes: int | None, on_cap: str, prefetch_blocks: int) -> OffloadEngine:
    return OffloadEngine(max_host_bytes=max_host_bytes, on_cap=on_cap, prefetch_blocks=prefetch_blocks)


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

    Without ``engine`` each copy is synchronous, on the current stream, into new host memory; with
    one, the context is one of the engine's blocks (asynchronous copies, a pool, prefetch).

    Args:
        module: The module running inside the context; its parameters and buffers are never copied.
        pin_memory: Copy into page-locked memory so the copy back to the accelerator can overlap
            (for tensors on a CUDA device only).
        min_offload_bytes: Saved tensors whose storage is smaller than this stay on their device.
        copy_cpu_tensors: Also copy saved tensors already in CPU memory, into separate CPU memory
            (see :attr:`OffloadOptions.copy_cpu_tensors`): for tests on machines without an accelerator.
        engine: The :class:`OffloadEngine` that copies, or None for synchronous copies.

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
    # Taken when the context is entered, not when the module was wrapped: FSDP2 swaps unsharded
    # parameters in during forward.
    owned = owned_storages(module)

    def pack(tensor: torch.Tensor) -> Packed:
        return pack_saved_tensor(tensor, options, owned)

    with saved_tensors_hooks(pack, unpack_saved_tensor):
        yield
