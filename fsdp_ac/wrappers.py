"""Drop-in activation checkpointing and offloading wrappers.

The names, parameter order and defaults are those of
``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` (torch 2.13), so switching is one
import line. The wrapper classes subclass torch's, so torch's FSDP and DCP treat them exactly as they
treat torch's own (``FSDP(checkpoint_wrapper(m)).module is m``, FQN cleaning, ``get_model_state_dict``).

What differs is names: in ``named_modules()`` a wrapper and the module it wraps share one clean name,
so ``named_parameters()``, ``named_buffers()`` and optimizer ``param_names`` computed from any module
of the model, root included, are the unwrapped model's; state dicts are saved with clean keys and load
from clean or legacy keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as _torch_wrappers
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from fsdp_ac.names import (
    WRAPPED_MODULE_ATTR,
    clean_load_report,
    restore_prefix_on_load,
    strip_prefix_on_save,
)
from fsdp_ac.offload import DEFAULT_MIN_OFFLOAD_BYTES, offload_saved_tensors
from fsdp_ac.policies import post_order, select_modules

__all__ = [
    "ActivationWrapper",
    "CheckpointImpl",
    "CheckpointWrapper",
    "OffloadWrapper",
    "apply_activation_checkpointing",
    "checkpoint_wrapper",
    "offload_wrapper",
]

CheckpointImpl = _torch_wrappers.CheckpointImpl
"""torch's own enum (``REENTRANT``, ``NO_REENTRANT``), so members from either import are the same."""


class ActivationWrapper(_torch_wrappers.ActivationWrapper):
    """Base class of the checkpoint and offload wrappers; not meant to be instantiated directly.

    The wrapped module lives at ``self._checkpoint_wrapped_module``. Attribute reads and indexing
    fall through to it. In ``named_modules()`` the wrapper and the wrapped module share one name, so
    every name derived from module traversal is the unwrapped model's.

    Args:
        mod: The module to wrap.

    Raises:
        TypeError: ``mod`` is not an ``nn.Module``.
    """

    def __init__(self, mod: nn.Module) -> None:
        if not isinstance(mod, nn.Module):
            raise TypeError(f"Activation wrappers wrap an nn.Module, got {type(mod).__name__}.")
        # torch's base __init__ registers hooks that double the prefix on legacy keys; ours replace them.
        nn.Module.__init__(self)
        setattr(self, WRAPPED_MODULE_ATTR, mod)
        self.register_state_dict_post_hook(strip_prefix_on_save)
        self.register_load_state_dict_pre_hook(restore_prefix_on_load)
        self.register_load_state_dict_post_hook(clean_load_report)

    def named_modules(
        self,
        memo: set[nn.Module] | None = None,
        prefix: str = "",
        remove_duplicate: bool = True,
    ) -> Iterator[tuple[str, nn.Module]]:
        """Yields this wrapper, then the wrapped module's ``named_modules()``, under one clean name.

        ``nn.Module.named_modules`` of a parent calls this method for each child, so every module
        of the model, the root included, lists clean names. The wrapper and the module it wraps
        share a name; the wrapped module comes second, so ``dict(model.named_modules())`` maps each
        name to the same module an unwrapped model has there. The wrapper itself stays visible:
        FSDP2 finds the state of a ``fully_shard``-ed wrapper by walking ``named_modules()``.
        """
        if memo is None:
            memo = set()
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        yield prefix, self
        wrapped: nn.Module = getattr(self, WRAPPED_MODULE_ATTR)
        yield from wrapped.named_modules(memo, prefix, remove_duplicate)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """Same as ``nn.Module.named_parameters``; names are clean through ``named_modules``.

        Overridden only to drop torch's base-class override, which rewrites names a second time.
        """
        return nn.Module.named_parameters(self, prefix, recurse, remove_duplicate)


class CheckpointWrapper(ActivationWrapper, _torch_wrappers.CheckpointWrapper):
    """Recomputes the wrapped module's activations in backward instead of saving them.

    Use it through :func:`checkpoint_wrapper` or :func:`apply_activation_checkpointing`.

    Args:
        mod: The module to wrap.
        checkpoint_impl: ``CheckpointImpl.NO_REENTRANT`` (default) or ``CheckpointImpl.REENTRANT``;
            ignored when ``checkpoint_fn`` is given.
        checkpoint_fn: A functional checkpoint to use instead of ``torch.utils.checkpoint.checkpoint``.
        **checkpoint_fn_kwargs: Passed to the checkpoint function on every call.

    Raises:
        TypeError: ``checkpoint_impl`` is not a ``CheckpointImpl``, or ``use_reentrant`` is passed
            alongside it.
    """

    def __init__(
        self,
        mod: nn.Module,
        checkpoint_impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT,
        checkpoint_fn: Callable[..., Any] | None = None,
        **checkpoint_fn_kwargs: Any,
    ) -> None:
        ActivationWrapper.__init__(self, mod)
        if not isinstance(checkpoint_impl, CheckpointImpl):
            raise TypeError(
                f"checkpoint_impl must be a CheckpointImpl member, got {checkpoint_impl!r}; use "
                "CheckpointImpl.NO_REENTRANT (recommended) or CheckpointImpl.REENTRANT."
            )
        self.checkpoint_impl = checkpoint_impl
        self.checkpoint_fn: partial[Any]
        if checkpoint_fn is None:
            if "use_reentrant" in checkpoint_fn_kwargs:
                raise TypeError(
                    "Pass checkpoint_impl=CheckpointImpl.REENTRANT or NO_REENTRANT instead of "
                    "use_reentrant; checkpoint_wrapper sets use_reentrant from checkpoint_impl."
                )
            self.checkpoint_fn = partial(
                _torch_checkpoint,
                use_reentrant=checkpoint_impl == CheckpointImpl.REENTRANT,
                **checkpoint_fn_kwargs,
            )
        else:
            self.checkpoint_fn = partial(checkpoint_fn, **checkpoint_fn_kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped module under the checkpoint function."""
        wrapped: nn.Module = getattr(self, WRAPPED_MODULE_ATTR)
        if self.checkpoint_impl == CheckpointImpl.REENTRANT and kwargs:
            # Reentrant checkpoint takes positional tensors only: carry keyword values positionally.
            keys = tuple(kwargs)
            n_args = len(args)

            def run_with_kwargs(*flat: Any) -> Any:
                return wrapped(*flat[:n_args], **dict(zip(keys, flat[n_args:], strict=True)))

            return self.checkpoint_fn(run_with_kwargs, *args, *kwargs.values())
        return self.checkpoint_fn(wrapped, *args, **kwargs)


class OffloadWrapper(ActivationWrapper, _torch_wrappers.OffloadWrapper):
    """Keeps the activations that the wrapped module saves for backward in CPU memory.

    Parameters, buffers, tensors already on the CPU and tensors below ``min_offload_bytes`` are
    never copied (see :func:`fsdp_ac.offload.offload_saved_tensors`).

    Args:
        mod: The module to wrap.
        pin_memory: Offload into page-locked memory (only where CUDA is available).
        min_offload_bytes: Saved tensors smaller than this stay on their device.
    """

    def __init__(
        self,
        mod: nn.Module,
        *,
        pin_memory: bool = True,
        min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
    ) -> None:
        ActivationWrapper.__init__(self, mod)
        if min_offload_bytes < 0:
            raise ValueError(f"min_offload_bytes must be >= 0, got {min_offload_bytes}.")
        self.pin_memory = pin_memory
        self.min_offload_bytes = min_offload_bytes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped module with its saved activations offloaded."""
        wrapped: nn.Module = getattr(self, WRAPPED_MODULE_ATTR)
        with offload_saved_tensors(
            wrapped, pin_memory=self.pin_memory, min_offload_bytes=self.min_offload_bytes
        ):
            return wrapped(*args, **kwargs)


def checkpoint_wrapper(
    module: nn.Module,
    checkpoint_impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT,
    checkpoint_fn: Callable[..., Any] | None = None,
    **checkpoint_fn_kwargs: Any,
) -> nn.Module:
    """Wraps ``module`` so that every call recomputes its activations in backward.

    Args:
        module: The module to wrap.
        checkpoint_impl: ``CheckpointImpl.NO_REENTRANT`` (default) or ``CheckpointImpl.REENTRANT``.
        checkpoint_fn: A functional checkpoint to use instead of ``torch.utils.checkpoint.checkpoint``;
            ``checkpoint_impl`` is then ignored.
        **checkpoint_fn_kwargs: Passed to the checkpoint function, e.g. ``preserve_rng_state``.

    Returns:
        A :class:`CheckpointWrapper` around ``module``.

    Raises:
        TypeError: See :class:`CheckpointWrapper`.

    Example:
        >>> block = checkpoint_wrapper(nn.Linear(8, 8))
        >>> [name for name, _ in block.named_parameters()]
        ['weight', 'bias']
    """
    return CheckpointWrapper(module, checkpoint_impl, checkpoint_fn, **checkpoint_fn_kwargs)


def offload_wrapper(
    module: nn.Module,
    *,
    pin_memory: bool = True,
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
) -> nn.Module:
    """Wraps ``module`` so that the activations it saves for backward live in CPU memory.

    Compose with :func:`checkpoint_wrapper` (``offload_wrapper(checkpoint_wrapper(m))``) to offload
    only the checkpointed block's inputs.

    Args:
        module: The module to wrap.
        pin_memory: Offload into page-locked memory (only where CUDA is available).
        min_offload_bytes: Saved tensors smaller than this stay on their device.

    Returns:
        An :class:`OffloadWrapper` around ``module``.

    Example:
        >>> block = offload_wrapper(nn.Linear(8, 8))
        >>> block(torch.randn(2, 8)).sum().backward()
    """
    return OffloadWrapper(module, pin_memory=pin_memory, min_offload_bytes=min_offload_bytes)


def apply_activation_checkpointing(
    model: nn.Module,
    checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] = checkpoint_wrapper,
    check_fn: Callable[[nn.Module], bool] = lambda _: True,
    auto_wrap_policy: Callable[..., bool] | Any | None = None,
) -> None:
    """Replaces selected submodules of ``model``, in place, by ``checkpoint_wrapper_fn(submodule)``.

    The root is never wrapped (use :func:`checkpoint_wrapper` on it directly), and neither is a
    module that already is an activation wrapper.

    Args:
        model: The model to modify in place.
        checkpoint_wrapper_fn: Builds the wrapper, e.g. :func:`checkpoint_wrapper`,
            :func:`offload_wrapper`, or a ``functools.partial`` of either.
        check_fn: Called on each submodule; ``True`` wraps it. Ignored when ``auto_wrap_policy``
            is given.
        auto_wrap_policy: An FSDP auto-wrap policy (``ModuleWrapPolicy``, ``CustomPolicy``, or a
            callable such as ``partial(transformer_auto_wrap_policy, ...)``); the same object can be
            passed to FSDP so AC regions and FSDP units coincide.

    Raises:
        TypeError: ``auto_wrap_policy`` is neither a policy object nor a callable.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        >>> apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Linear))
        >>> [name for name, _ in model.named_parameters()]
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    targets = select_modules(model, check_fn, auto_wrap_policy)
    parents: dict[nn.Module, list[tuple[nn.Module, str]]] = {}
    for parent in post_order(model):
        # _modules, not named_children(): a module shared by two slots must be wrapped in both.
        for name, child in parent._modules.items():
            if child is not None:
                parents.setdefault(child, []).append((parent, name))
    for target in targets:
        wrapper = checkpoint_wrapper_fn(target)
        for parent, name in parents.get(target, []):
            setattr(parent, name, wrapper)
