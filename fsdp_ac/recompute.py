"""What happens when a checkpointed region runs again in backward: the replay rule.

:class:`RecomputeRegion` runs one call of a checkpointed module: hooks that changed a value in the
forward run again in the replay, observing ones run once per step, mutated buffers are restored, and
each saved tensor is checked against the forward's (docs/differences.md, "The replay rule").
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

from fsdp_ac._compat import (
    ComposableState,
    NormBase,
    TorchDispatchMode,
    TransparentSavedTensorsHooks,
    saved_tensors_hooks_in_scope,
    tree_leaves,
)

_RECOMPUTING: ContextVar[bool] = ContextVar("fsdp_ac_recomputing", default=False)

_REPLAY_ATTR = "__fsdp_ac_replay__"

_Hook = TypeVar("_Hook", bound=Callable[..., Any])


def is_recomputing() -> bool:
    """Returns True while a checkpointed region replays its forward during backward.

    For forward code (or a hook marked with :func:`replay_hook`) that must act once per step.

    Example:
        >>> class Counter(nn.Module):
        ...     def forward(self, x):
        ...         if not is_recomputing():
        ...             self.calls = getattr(self, "calls", 0) + 1
        ...         return x * 2
    """
    return _RECOMPUTING.get()


class _MarkedHook:
    """A callable that cannot carry an attribute itself (a bound method), with its replay mark."""

    def __init__(self, hook: Callable[..., Any], replay: bool) -> None:
        functools.update_wrapper(self, hook)
        self.hook = hook
        setattr(self, _REPLAY_ATTR, replay)

    def __call__(self, *args: Any) -> Any:
        return self.hook(*args)


def replay_hook(hook: _Hook, *, replay: bool = True) -> _Hook:
    """Marks a forward hook or pre-hook to run again in every replay (``replay=True``) or never.

    By default the replay runs exactly the hooks whose forward call changed a value. ``replay=True``
    suits a hook that sets a plain attribute the forward reads; ``replay=False`` one that returns
    its input unchanged while counting calls (its return value is not applied in the replay).

    Args:
        hook: The hook to register with ``register_forward_hook`` or ``register_forward_pre_hook``.
        replay: Whether checkpointed regions call it again when they recompute in backward.

    Returns:
        ``hook`` itself, marked; a bound method (which cannot carry the mark) comes back wrapped.

    Raises:
        TypeError: ``hook`` is not callable.

    Example:
        >>> def pick_adapter(module, args):
        ...     module.active = schedule.current()  # a plain attribute the forward reads
        >>> handle = block.register_forward_pre_hook(replay_hook(pick_adapter, replay=True))
    """
    if not callable(hook):
        raise TypeError(f"replay_hook marks a hook function, got {type(hook).__name__}: {hook!r}.")
    try:
        setattr(hook, _REPLAY_ATTR, replay)
    except (AttributeError, TypeError):
        return _MarkedHook(hook, replay)  # type: ignore[return-value]
    return hook


def _is_framework_hook(hook: Callable[..., Any]) -> bool:
    """Whether a hook is torch.distributed's (by module, through wraps/partial layers, or its state)."""
    fn: Any = hook
    for _ in range(8):
        if isinstance(getattr(fn, "__self__", None), ComposableState):
            return True
        if (getattr(fn, "__module__", None) or "").startswith("torch.distributed"):
            return True
        fn = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
        if fn is None:
            return False
    return False


def _mark(hook: Callable[..., Any]) -> bool | None:
    """``True``/``False``: the hook always/never runs in the replay; ``None``: its forward call decides."""
    marked = getattr(hook, _REPLAY_ATTR, None)
    if marked is not None:
        return bool(marked)
    return True if _is_framework_hook(hook) else None


def has_user_hooks(root: nn.Module) -> bool:
    """Whether a forward hook or pre-hook inside ``root`` is not one of ``torch.distributed``'s.

    Dynamo evaluates it while tracing, guarded on the hooks like any module attribute.
    """
    for module in _submodules(root):
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                if not _is_framework_hook(hook):
                    return True
    return False


def _versions(values: Iterable[Any]) -> list[int]:
    return [
        t._version for t in tree_leaves(list(values)) if isinstance(t, torch.Tensor) and not t.is_inference()
    ]


def _module_state(module: nn.Module) -> list[int]:
    """What a hook can change on its module: tensor versions, and which tensors its attributes hold."""
    state = [t._version for t in module._parameters.values() if t is not None and not t.is_inference()]
    state += [t._version for t in module._buffers.values() if t is not None and not t.is_inference()]
    state += [id(v) for v in module.__dict__.values() if isinstance(v, torch.Tensor)]
    return state


_HookKey = tuple[int, int]  # id of the hooks dict, handle id


class _Recorder:
    """Stands in for a hook during the forward and records whether each call changed a value."""

    __slots__ = ("hook", "key", "log")

    def __init__(self, hook: Callable[..., Any], key: _HookKey, log: dict[_HookKey, list[bool]]) -> None:
        self.hook = hook
        self.key = key
        self.log = log

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        before = _versions(args), _module_state(module)
        result = self.hook(module, *args)
        changed = result is not None or (_versions(args), _module_state(module)) != before
        self.log.setdefault(self.key, []).append(changed)
        return result


class _Replayer:
    """Stands in for a hook during the replay: calls it where the forward's call changed a value."""

    __slots__ = ("decisions", "hook")

    def __init__(self, hook: Callable[..., Any], decisions: Iterable[bool]) -> None:
        self.hook = hook
        self.decisions = deque(decisions)

    def __call__(self, *args: Any) -> Any:
        # A call the forward did not make (the replay calls a module more often) runs, as in torch.
        if self.decisions and not self.decisions.popleft():
            return None
        return self.hook(*args)


def _skip(*args: Any) -> None:  # a hook marked replay=False, in the replay
    del args


def _hook_dicts(modules: Iterable[nn.Module]) -> Iterator[dict[int, Callable[..., Any]]]:
    for module in modules:
        if module._forward_pre_hooks:
            yield module._forward_pre_hooks
        if module._forward_hooks:
            yield module._forward_hooks


@contextlib.contextmanager
def _swapped_hooks(
    hook_dicts: list[dict[int, Callable[..., Any]]],
    stand_in: Callable[[dict[int, Callable[..., Any]], int, Callable[..., Any]], Callable[..., Any] | None],
) -> Iterator[None]:
    """Replaces hooks in place (same dicts, same handle ids, so flags and handles keep working)."""
    swapped: list[tuple[dict[int, Callable[..., Any]], int, Callable[..., Any], Callable[..., Any]]] = []
    try:
        for hooks in hook_dicts:
            for handle_id, hook in list(hooks.items()):
                replacement = stand_in(hooks, handle_id, hook)
                if replacement is not None:
                    hooks[handle_id] = replacement
                    swapped.append((hooks, handle_id, hook, replacement))
        yield
    finally:
        for hooks, handle_id, hook, replacement in swapped:
            # A hook removed through its handle meanwhile stays removed.
            if hooks.get(handle_id) is replacement:
                hooks[handle_id] = hook


def _submodules(root: nn.Module) -> list[nn.Module]:
    """``root.modules()``, breadth first."""
    found = [root]
    seen = {id(root)}
    for module in found:
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


_NO_CONTEXT = contextlib.nullcontext()


def _running_statistics(module: nn.Module) -> list[torch.Tensor]:
    """Buffers a norm layer updates in training, which CPU kernels do without bumping their version."""
    if isinstance(module, NormBase) and module.training and module.track_running_stats:
        return [b for b in (module.running_mean, module.running_var) if b is not None]
    return []


class RecomputationMismatchError(RuntimeError):
    """The replay of a checkpointed region saved different tensors than its original forward."""


class RandomOpWithoutRngStateError(RuntimeError):
    """A random op ran in a checkpointed region whose RNG state is not preserved."""


_LIKELY_CAUSES = (
    "Likely cause: the region's forward depends on state that changed between forward and backward "
    "(a module attribute or global flag set after the forward, a buffer the forward updates, a hook "
    "marked replay_hook(..., replay=False) that changes a value, torch.is_grad_enabled() or autocast "
    "differing, or random ops with preserve_rng_state=False). Make the forward a pure function of its "
    "inputs and parameters, or use fsdp_ac.is_recomputing() to keep one-time logic out of the replay."
)


class _SavedTensorAudit:
    """Saved-tensor hooks over (and delegating to) torch's checkpoint hooks: compare forward and replay."""

    __slots__ = ("check_values", "metadata", "position", "region_name", "values")

    def __init__(self, region_name: str, check_values: bool) -> None:
        self.region_name = region_name
        self.check_values = check_values
        self.metadata: list[tuple[Any, ...]] = []
        self.values: list[torch.Tensor] = []
        self.position = 0

    def recording(self) -> contextlib.AbstractContextManager[Any]:
        outer = saved_tensors_hooks_in_scope()
        if outer is None:  # not under torch's non-reentrant checkpoint: nothing to audit
            return contextlib.nullcontext()
        outer_pack = outer[0]
        metadata, values, check_values = self.metadata, self.values, self.check_values

        def pack(tensor: torch.Tensor) -> Any:
            metadata.append((tensor.shape, tensor.dtype, tensor.device, tensor.layout))
            if check_values:
                values.append(tensor.detach().clone())
            return outer_pack(tensor)

        return TransparentSavedTensorsHooks(pack, outer)

    def comparing(self) -> contextlib.AbstractContextManager[Any]:
        self.position = 0
        outer = saved_tensors_hooks_in_scope()
        if outer is None or not self.metadata:
            self.position = len(self.metadata)
            return contextlib.nullcontext()
        outer_pack = outer[0]

        def pack(tensor: torch.Tensor) -> Any:
            index = self.position
            self.position += 1
            if index >= len(self.metadata):
                raise RecomputationMismatchError(
                    f"Checkpointed region '{self.region_name}' saved more tensors when recomputed in "
                    f"backward than in forward ({len(self.metadata)}). {_LIKELY_CAUSES}"
                )
            meta = (tensor.shape, tensor.dtype, tensor.device, tensor.layout)
            if meta != self.metadata[index]:
                raise RecomputationMismatchError(
                    f"Checkpointed region '{self.region_name}' recomputed a different tensor in "
                    f"backward: saved tensor #{index} was (shape, dtype, device, layout) = "
                    f"{_describe(self.metadata[index])} in forward and {_describe(meta)} in the "
                    f"recomputation. {_LIKELY_CAUSES}"
                )
            if self.check_values and not torch.equal(tensor.detach(), self.values[index]):
                diff = (tensor.detach().double() - self.values[index].double()).abs().max().item()
                raise RecomputationMismatchError(
                    f"Checkpointed region '{self.region_name}' recomputed different values in "
                    f"backward: saved tensor #{index} {_describe(meta[:2])} differs by up to {diff:g} "
                    f"from forward. {_LIKELY_CAUSES}"
                )
            return outer_pack(tensor)

        return TransparentSavedTensorsHooks(pack, outer)

    def check_count(self) -> None:
        """Raises if a replay that ran to its end saved fewer tensors (early stop ends a full one sooner)."""
        if self.position < len(self.metadata):
            raise RecomputationMismatchError(
                f"Checkpointed region '{self.region_name}' saved fewer tensors when recomputed in "
                f"backward ({self.position}) than in forward ({len(self.metadata)}). {_LIKELY_CAUSES}"
            )


def _describe(meta: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(tuple(m) if isinstance(m, torch.Size) else m for m in meta)


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


class RecomputeRegion:
    """One call of a checkpointed module: its original forward, then any replays in backward.

    Args:
        module: The checkpointed module.
        name: The region's name in messages (its qualified name in the model where known).
        guard_random_ops: Refuse random ops in the original forward (RNG state not preserved).
        audit: Compare the metadata of the tensors the replay saves with the forward's.
        check_values: Also compare their values (a debugging aid; costs a copy of each).
    """

    __slots__ = (
        "__weakref__",
        "_audit",
        "_hook_log",
        "_modules",
        "_mutated_buffers",
        "calls",
        "guard_random_ops",
        "module",
        "name",
    )

    def __init__(
        self,
        module: nn.Module,
        name: str,
        *,
        guard_random_ops: bool = False,
        audit: bool = True,
        check_values: bool = False,
    ) -> None:
        self.module = module
        self.name = name
        self.guard_random_ops = guard_random_ops
        self.calls = 0
        self._audit = _SavedTensorAudit(name, check_values) if audit or check_values else None
        self._hook_log: dict[_HookKey, list[bool]] = {}
        self._mutated_buffers: list[torch.Tensor] = []
        self._modules: list[nn.Module] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the module: the first call is the forward, every later call a replay."""
        self.calls += 1
        if self.calls == 1:
            return self._forward(args, kwargs)
        token = _RECOMPUTING.set(True)
        try:
            return self._replay(args, kwargs)
        finally:
            _RECOMPUTING.reset(token)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        modules = self._modules = _submodules(self.module)
        buffers = [(b, b._version) for m in modules for b in m._buffers.values() if b is not None]
        # Running statistics change without a version bump on CPU, so they count as mutated.
        statistics = [b for m in modules if m._buffers for b in _running_statistics(m)]
        hook_dicts = list(_hook_dicts(modules))
        audit = self._audit.recording() if self._audit is not None else _NO_CONTEXT
        guard = _RandomOpGuard(self.name) if self.guard_random_ops else _NO_CONTEXT
        hooks = _swapped_hooks(hook_dicts, self._recorder) if hook_dicts else _NO_CONTEXT
        with audit, guard, hooks:
            output = self.module(*args, **kwargs)
        if buffers:
            mutated = {id(b): b for b in statistics}
            mutated.update((id(b), b) for b, version in buffers if b._version != version)
            self._mutated_buffers = list(mutated.values())
        return output

    def _recorder(
        self, hooks: dict[int, Callable[..., Any]], handle_id: int, hook: Callable[..., Any]
    ) -> Callable[..., Any] | None:
        if _mark(hook) is not None:
            return None
        return _Recorder(hook, (id(hooks), handle_id), self._hook_log)

    def _replayer(
        self, hooks: dict[int, Callable[..., Any]], handle_id: int, hook: Callable[..., Any]
    ) -> Callable[..., Any] | None:
        mark = _mark(hook)
        if mark is not None:
            return None if mark else _skip
        decisions = self._hook_log.get((id(hooks), handle_id))
        if decisions is None or all(decisions):
            return None  # registered after the forward, or changed a value on every call: it runs
        return _Replayer(hook, decisions)

    def _replay(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Restore what the replay mutates again, so each step updates running statistics once.
        snapshot = [(b, b.detach().clone()) for b in self._mutated_buffers]
        try:
            hook_dicts = list(_hook_dicts(self._modules))
            hooks = _swapped_hooks(hook_dicts, self._replayer) if hook_dicts else _NO_CONTEXT
            audit = self._audit.comparing() if self._audit is not None else _NO_CONTEXT
            with hooks, audit:
                output = self.module(*args, **kwargs)
            if self._audit is not None:
                self._audit.check_count()
            return output
        finally:
            for buffer, value in snapshot:
                # .data writes without bumping the version autograd checks saved tensors against.
                buffer.data.copy_(value)
