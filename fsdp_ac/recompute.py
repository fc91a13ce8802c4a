"""What happens when a checkpointed region runs again in backward, and how to keep it harmless.

Recomputation replays a module's forward. Without care that replay has side effects a user never
asked for: BatchNorm updates its running statistics twice, forward hooks fire twice, and a forward
that depends on mutable state recomputes different tensors. :class:`RecomputeRegion` runs one call of
a checkpointed module and makes the replay invisible:

- :func:`is_recomputing` tells user code that the current forward is a replay;
- module buffers changed by the replay (running statistics, counters) are restored;
- forward hooks and pre-hooks inside the region are skipped during the replay, except those of
  torch's distributed states (FSDP2's all-gather hooks must run);
- every tensor saved for backward is checked against the replay, and a mismatch raises
  :class:`RecomputationMismatchError` naming the region and the likely cause;
- with ``preserve_rng_state=False``, a random op in the region is refused unless allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.distributed._composable_state import _State
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "RandomOpWithoutRngStateError",
    "RecomputationMismatchError",
    "RecomputeRegion",
    "is_recomputing",
]

_RECOMPUTING: ContextVar[bool] = ContextVar("fsdp_ac_recomputing", default=False)


def is_recomputing() -> bool:
    """Returns True while a checkpointed region replays its forward during backward.

    Use it in forward code or hooks that must act once per training step, not once per execution.

    Example:
        >>> class Counter(nn.Module):
        ...     def forward(self, x):
        ...         if not is_recomputing():
        ...             self.calls = getattr(self, "calls", 0) + 1
        ...         return x * 2
    """
    return _RECOMPUTING.get()


class RecomputationMismatchError(RuntimeError):
    """The replay of a checkpointed region saved different tensors than its original forward."""


class RandomOpWithoutRngStateError(RuntimeError):
    """A random op ran in a checkpointed region whose RNG state is not preserved."""


_LIKELY_CAUSES = (
    "Likely cause: the region's forward depends on state that changed between forward and backward "
    "(a module attribute or global flag set after the forward, a buffer the forward updates, "
    "torch.is_grad_enabled() or autocast differing, or random ops with preserve_rng_state=False). "
    "Make the forward a pure function of its inputs and parameters, or use fsdp_ac.is_recomputing() "
    "to keep one-time logic out of the replay."
)


class _SavedTensorAudit:
    """Saved-tensor hooks layered over torch's checkpoint hooks that compare forward and replay.

    Pushed inside the checkpointed function, they delegate every pack and unpack to the hooks torch's
    checkpoint installed, so checkpointing behaves exactly as without them.
    """

    def __init__(self, region_name: str, check_values: bool) -> None:
        self.region_name = region_name
        self.check_values = check_values
        self.metadata: list[tuple[Any, ...]] = []
        self.values: list[torch.Tensor] = []

    @staticmethod
    def _meta(tensor: torch.Tensor) -> tuple[Any, ...]:
        return (tuple(tensor.shape), tensor.dtype, tensor.device, tensor.layout)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if outer is None:  # not under torch's non-reentrant checkpoint: nothing to audit
            yield
            return
        outer_pack, outer_unpack = outer

        def pack(tensor: torch.Tensor) -> Any:
            self.metadata.append(self._meta(tensor))
            if self.check_values:
                self.values.append(tensor.detach().clone())
            return outer_pack(tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, outer_unpack):
            yield

    @contextlib.contextmanager
    def comparing(self) -> Iterator[None]:
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if outer is None or not self.metadata:
            yield
            return
        outer_pack, outer_unpack = outer
        position = 0

        def pack(tensor: torch.Tensor) -> Any:
            nonlocal position
            index, position = position, position + 1
            if index >= len(self.metadata):
                raise RecomputationMismatchError(
                    f"Checkpointed region '{self.region_name}' saved more tensors when recomputed in "
                    f"backward than in forward ({len(self.metadata)}). {_LIKELY_CAUSES}"
                )
            meta = self._meta(tensor)
            if meta != self.metadata[index]:
                raise RecomputationMismatchError(
                    f"Checkpointed region '{self.region_name}' recomputed a different tensor in "
                    f"backward: saved tensor #{index} was (shape, dtype, device, layout) = "
                    f"{self.metadata[index]} in forward and {meta} in the recomputation. {_LIKELY_CAUSES}"
                )
            if self.check_values and not torch.equal(tensor.detach(), self.values[index]):
                diff = (tensor.detach().double() - self.values[index].double()).abs().max().item()
                raise RecomputationMismatchError(
                    f"Checkpointed region '{self.region_name}' recomputed different values in "
                    f"backward: saved tensor #{index} {meta[:2]} differs by up to {diff:g} from forward. "
                    f"{_LIKELY_CAUSES}"
                )
            return outer_pack(tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, outer_unpack):
            yield


class _RandomOpGuard(TorchDispatchMode):
    """Refuses seeded random ops (dropout, bernoulli, randn, ...) while it is active."""

    def __init__(self, region_name: str) -> None:
        super().__init__()
        self.region_name = region_name

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise RandomOpWithoutRngStateError(
                f"Checkpointed region '{self.region_name}' runs the random op {func} in training with "
                "preserve_rng_state=False, so its recomputation draws different random numbers and the "
                "gradients are wrong. Drop preserve_rng_state=False (the default preserves it), or pass "
                "allow_rng_divergence=True to checkpoint_wrapper if you accept different randomness."
            )
        return func(*args, **(kwargs or {}))


def _is_framework_hook(hook: Callable[..., Any]) -> bool:
    """Hooks of torch's distributed states (FSDP2's all-gather) must run in the replay too."""
    return isinstance(getattr(hook, "__self__", None), _State)


@contextlib.contextmanager
def _without_user_hooks(modules: list[nn.Module]) -> Iterator[None]:
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for module in modules:
            for attr in ("_forward_pre_hooks", "_forward_hooks"):
                hooks = getattr(module, attr)
                if hooks:
                    saved.append((module, attr, hooks))
                    kept = OrderedDict((k, h) for k, h in hooks.items() if _is_framework_hook(h))
                    object.__setattr__(module, attr, kept)
        yield
    finally:
        for module, attr, hooks in saved:
            object.__setattr__(module, attr, hooks)


@contextlib.contextmanager
def _restoring_buffers(module: nn.Module) -> Iterator[None]:
    # Every buffer is restored, not only those whose version moved: some kernels (CPU batch norm)
    # update running statistics without bumping the version counter.
    snapshot = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in snapshot:
                # .data writes without bumping the version autograd checks saved tensors against.
                buffer.data.copy_(value)


@dataclasses.dataclass
class RecomputeRegion:
    """One call of a checkpointed module: its original forward, then any replays in backward.

    Args:
        module: The checkpointed module.
        name: The region's name in messages (its qualified name in the model where known).
        guard_random_ops: Refuse random ops in the original forward (RNG state not preserved).
        check_values: Also compare the values of saved tensors (a debugging aid; costs a copy).
    """

    module: nn.Module
    name: str
    guard_random_ops: bool = False
    check_values: bool = False
    calls: int = 0
    audit: _SavedTensorAudit = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.audit = _SavedTensorAudit(self.name, self.check_values)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the module: the first call is the forward, every later call a replay."""
        self.calls += 1
        if self.calls == 1:
            guard = _RandomOpGuard(self.name) if self.guard_random_ops else contextlib.nullcontext()
            with self.audit.recording(), guard:
                return self.module(*args, **kwargs)
        token = _RECOMPUTING.set(True)
        try:
            with (
                _restoring_buffers(self.module),
                _without_user_hooks(list(self.module.modules())),
                self.audit.comparing(),
            ):
                return self.module(*args, **kwargs)
        finally:
            _RECOMPUTING.reset(token)
