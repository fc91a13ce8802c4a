"""Drop-in activation checkpointing and offloading wrappers.

The names, parameter order and defaults are those of
``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` (torch 2.13), so switching is one
import line. The wrapper classes subclass torch's, so torch's FSDP and DCP treat them exactly as they
treat torch's own (``FSDP(checkpoint_wrapper(m)).module is m``, FQN cleaning, ``get_model_state_dict``).

What differs:

- Names: in ``named_modules()`` a wrapper and the module it wraps share one clean name, so
  ``named_parameters()``, ``named_buffers()`` and optimizer ``param_names`` computed from any module
  are the unwrapped model's; state dicts are saved with clean keys and load from clean or legacy keys.
- Correctness by default: reentrant checkpointing trains a region whose inputs need no gradient, takes
  any nesting of tensors in and out, and trains under DDP in every pattern exactly as without AC
  (tied weights, a region run twice, ``find_unused_parameters``); the replay
  in backward recomputes what the forward computed (value-changing, tensor-parallel and FSDP2 hooks
  run again) while observing hooks and buffer updates happen once per step (the replay rule,
  :mod:`fsdp_ac.recompute`); a random op with ``preserve_rng_state=False`` is refused; a replay that
  differs from the forward names the region.
- Wrapping is idempotent and undoable (:func:`~fsdp_ac.unwrap`,
  :func:`~fsdp_ac.remove_activation_checkpointing`).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from fsdp_ac._compat import (
    WRAPPED_MODULE_ATTR,
    CheckpointImpl,
    TorchActivationWrapper,
    TorchCheckpointWrapper,
    TorchOffloadWrapper,
    active_ddp_module,
    checkpoint_function,
)
from fsdp_ac.names import (
    activation_wrappers,
    clean_load_report,
    restore_prefix_on_load,
    strip_prefix_on_save,
    unwrap,
)
from fsdp_ac.offload import DEFAULT_MIN_OFFLOAD_BYTES, OffloadEngine, OffloadOptions, offload_saved_tensors
from fsdp_ac.recompute import RecomputeRegion, has_user_hooks

__all__ = [
    "ActivationWrapper",
    "CheckpointImpl",
    "CheckpointWrapper",
    "OffloadWrapper",
    "checkpoint_wrapper",
    "naming_regions",
    "offload_wrapper",
    "refuse_hf_gradient_checkpointing",
    "require_module",
]


_REGION_NAME: ContextVar[str | None] = ContextVar("fsdp_ac_region_name", default=None)
"""The qualified name the application path is wrapping; a wrapper built meanwhile takes it."""


@contextlib.contextmanager
def naming_regions(name: str) -> Iterator[None]:
    """Wrappers built inside this context take ``name`` as their ``region_name``.

    The application path (:mod:`fsdp_ac.apply`) calls a user's ``checkpoint_wrapper_fn(module)``,
    which has no name argument; this is how the wrapper learns its qualified name at construction.
    """
    token = _REGION_NAME.set(name)
    try:
        yield
    finally:
        _REGION_NAME.reset(token)


_CONSTRUCTING = "_fsdp_ac_constructing"
"""Present in a wrapper's ``__dict__`` until its whole ``__init__`` chain has returned."""


class _Constructed(abc.ABCMeta):
    """The wrappers' metaclass: marks a wrapper constructed once its outermost ``__init__`` returns.

    A subclass's ``__init__`` runs on after the base class's, so only the call that constructs the
    instance knows when construction ends. ``abc.ABCMeta`` because torch's wrappers are ABCs.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        wrapper = super().__call__(*args, **kwargs)
        wrapper.__dict__.pop(_CONSTRUCTING, None)
        return wrapper


class ActivationWrapper(TorchActivationWrapper, metaclass=_Constructed):
    """Base class of the checkpoint and offload wrappers; not meant to be instantiated directly.

    The wrapped module lives at ``self._checkpoint_wrapped_module``. Attribute reads, ``len()``,
    iteration and indexing reach it, and so do writes of public attributes the wrapper does not own
    (see :meth:`__setattr__`). In ``named_modules()`` the wrapper and the wrapped
    module share one name, so every name derived from module traversal is the unwrapped model's.

    Args:
        mod: The module to wrap.
        region_name: The name messages give the region; default: the name :func:`naming_regions`
            gives, else the wrapped module's class name.

    Raises:
        TypeError: ``mod`` is not an ``nn.Module``.
        ValueError: ``mod`` is an FSDP1 unit and this torch's DCP cannot be adapted to restore the
            nesting (see :func:`fsdp_ac.dcp.adapt_dcp_names`).
    """

    region_name: str
    """The wrapped module's name in messages: its qualified name when wrapped by
    the application path (:mod:`fsdp_ac.apply`), else its class name."""

    def __init__(self, mod: nn.Module, *, region_name: str | None = None) -> None:
        require_module(mod, type(self).__name__)
        # torch's base __init__ registers hooks that double the prefix on legacy keys; ours replace them.
        nn.Module.__init__(self)
        self.__dict__[_CONSTRUCTING] = True
        nn.Module.__setattr__(self, WRAPPED_MODULE_ATTR, mod)
        self.register_state_dict_post_hook(strip_prefix_on_save)
        self.register_load_state_dict_pre_hook(restore_prefix_on_load)
        self.register_load_state_dict_post_hook(clean_load_report)
        self.region_name = region_name or _REGION_NAME.get() or type(mod).__name__
        _adapt_dcp_to_fsdp1_inside(self, mod)

    def __setattr__(self, name: str, value: Any) -> None:
        """Sets a public attribute the wrapper does not own on the wrapped module.

        The wrapper owns every attribute set while it is constructed (wrappers take all their options
        then), every private one, and, later, each one it already has (in its ``__dict__``, parameters,
        buffers or submodules) or its class defines. So a subclass's new option stays on the wrapper
        without being listed anywhere, and ``wrapper.dropout_p = 0.0`` reaches the wrapped module.

        FSDP1's auto-wrap replaces the wrapped module by its FSDP unit through here (AC applied
        before FSDP1 gives ``CheckpointWrapper(FSDP(block))``); DCP then needs
        :func:`fsdp_ac.dcp.adapt_dcp_names` to restore the nesting's optimizer state.

        Raises:
            ValueError: See :func:`fsdp_ac.dcp.adapt_dcp_names`.
        """
        state = self.__dict__
        modules = state.get("_modules", {})
        if name == WRAPPED_MODULE_ATTR and name in modules:
            _adapt_dcp_to_fsdp1_inside(self, value)
        forwarded = (
            WRAPPED_MODULE_ATTR in modules
            and _CONSTRUCTING not in state
            and not name.startswith("_")
            and name not in state
            and not any(name in state.get(kind, {}) for kind in ("_parameters", "_buffers", "_modules"))
            and not hasattr(type(self), name)
        )
        if forwarded:
            setattr(modules[WRAPPED_MODULE_ATTR], name, value)
        else:
            super().__setattr__(name, value)

    def __bool__(self) -> bool:
        """Always true, as for any module (``__len__`` alone would make an empty one falsy or fail)."""
        return True

    def __len__(self) -> int:
        """The wrapped module's length (e.g. of an ``nn.Sequential`` or ``nn.ModuleList``)."""
        return len(self._modules[WRAPPED_MODULE_ATTR])  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        """Iterates the wrapped module (e.g. the layers of an ``nn.Sequential``)."""
        return iter(self._modules[WRAPPED_MODULE_ATTR])  # type: ignore[call-overload]

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


class CheckpointWrapper(ActivationWrapper, TorchCheckpointWrapper):
    """Recomputes the wrapped module's activations in backward instead of saving them.

    Use it through :func:`checkpoint_wrapper` or :func:`~fsdp_ac.apply_activation_checkpointing`. Every call
    autograd records is checkpointed, in eval mode too; calls under ``torch.no_grad()`` or
    ``torch.inference_mode()`` run the module directly. The replay follows the replay rule of
    :mod:`fsdp_ac.recompute`.

    Args:
        mod: The module to wrap.
        checkpoint_impl: ``CheckpointImpl.NO_REENTRANT`` (default) or ``CheckpointImpl.REENTRANT``;
            ignored when ``checkpoint_fn`` is given.
        checkpoint_fn: A functional checkpoint to use instead of ``torch.utils.checkpoint.checkpoint``.
        allow_rng_divergence: With ``preserve_rng_state=False``, allow random ops in the region
            although their recomputation draws different numbers.
        check_recomputed_values: Compare every recomputed saved tensor with the forward's, bitwise,
            and raise on a difference. A debugging aid: it keeps a copy of each saved tensor.
        offload: Also keep what the checkpoint saves (its inputs) in CPU memory, with these options:
            ``offload_wrapper(checkpoint_wrapper(m))`` in one wrapper, which is what an FSDP1 unit
            without ``use_orig_params`` can hold (it looks through one wrapper only).
        engine: The :class:`~fsdp_ac.offload.OffloadEngine` that copies for ``offload``; None copies
            synchronously.
        region_name: See :class:`ActivationWrapper`.
        **checkpoint_fn_kwargs: Passed to the checkpoint function on every call.

    Raises:
        TypeError: ``checkpoint_impl`` is not a ``CheckpointImpl``, or ``use_reentrant`` is passed
            alongside it.
    """

    offload: OffloadOptions | None = None
    """How the checkpoint's inputs are offloaded; None keeps them on their device."""
    engine: OffloadEngine | None = None
    """The engine that copies for ``offload``, or None for synchronous copies."""

    def __init__(
        self,
        mod: nn.Module,
        checkpoint_impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT,
        checkpoint_fn: Callable[..., Any] | None = None,
        *,
        allow_rng_divergence: bool = False,
        check_recomputed_values: bool = False,
        offload: OffloadOptions | None = None,
        engine: OffloadEngine | None = None,
        region_name: str | None = None,
        **checkpoint_fn_kwargs: Any,
    ) -> None:
        ActivationWrapper.__init__(self, mod, region_name=region_name)
        self.offload = offload
        self.engine = engine
        if not isinstance(checkpoint_impl, CheckpointImpl):
            raise TypeError(
                f"checkpoint_impl must be a CheckpointImpl member, got {checkpoint_impl!r}; use "
                "CheckpointImpl.NO_REENTRANT (recommended) or CheckpointImpl.REENTRANT."
            )
        self.checkpoint_impl = checkpoint_impl
        self.allow_rng_divergence = allow_rng_divergence
        self.check_recomputed_values = check_recomputed_values
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
        self._uses_torch_reentrant = checkpoint_fn is None and checkpoint_impl == CheckpointImpl.REENTRANT
        # The region's audit checks saved tensors unless the user chose torch's check themselves;
        # with torch's non-reentrant checkpoint it replaces torch's check of the same metadata.
        self._audit_saved_tensors = "determinism_check" not in checkpoint_fn_kwargs
        self._replaces_torch_check = (
            self._audit_saved_tensors
            and checkpoint_fn is None
            and checkpoint_impl == CheckpointImpl.NO_REENTRANT
        )
        self._checked_first_forward = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped module under the checkpoint function (directly when autograd is off).

        Like torch's wrapper, every call that autograd records is checkpointed, in eval mode too (RL
        and LoRA runs call ``.eval()`` to turn dropout off and still backpropagate); calls under
        ``torch.no_grad()`` or ``torch.inference_mode()`` save nothing, so they run the module directly.
        """
        wrapped: nn.Module = getattr(self, WRAPPED_MODULE_ATTR)
        if not torch.is_grad_enabled():
            return wrapped(*args, **kwargs)
        if self.offload is None:
            return self._checkpoint_or_compile(wrapped, args, kwargs)
        with offload_saved_tensors(wrapped, **dataclasses.asdict(self.offload), engine=self.engine):
            return self._checkpoint_or_compile(wrapped, args, kwargs)

    def _checkpoint_or_compile(
        self, wrapped: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if torch.compiler.is_compiling():
            if has_user_hooks(wrapped):
                # The compiled backward recomputes traced ops but replays no Python side effects, so
                # only an eager region applies the replay rule to these hooks (one graph break).
                return _checkpoint_eagerly(self, wrapped, args, kwargs)
            # Without user hooks the replay happens inside the compiled backward graph; the region's
            # bookkeeping would break the graph.
            if self._uses_torch_reentrant:
                return _reentrant_call(self.checkpoint_fn, wrapped, args, kwargs)
            return self.checkpoint_fn(wrapped, *args, **kwargs)
        return self._checkpoint(wrapped, args, kwargs)

    def _checkpoint(self, wrapped: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The eager path: one :class:`RecomputeRegion` per call applies the replay rule."""
        if not self._checked_first_forward:
            refuse_hf_gradient_checkpointing(wrapped, self.region_name)
            self._checked_first_forward = True
        _refuse_stateful_cache(self.region_name, args, kwargs)
        region = RecomputeRegion(
            wrapped,
            self.region_name,
            guard_random_ops=not self.checkpoint_fn.keywords.get("preserve_rng_state", True)
            and not self.allow_rng_divergence,
            audit=self._audit_saved_tensors,
            check_values=self.check_recomputed_values,
        )
        if self._uses_torch_reentrant:
            return _reentrant_call(self.checkpoint_fn, region, args, kwargs)
        if self._replaces_torch_check:
            # The region's audit checks each saved tensor's metadata and names the region on a
            # mismatch; torch's own check of the same metadata would only repeat the work.
            return self.checkpoint_fn(region, *args, determinism_check="none", **kwargs)
        return self.checkpoint_fn(region, *args, **kwargs)


@torch.compiler.disable  # type: ignore[untyped-decorator]
def _checkpoint_eagerly(
    wrapper: CheckpointWrapper, wrapped: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return wrapper._checkpoint(wrapped, args, kwargs)


class OffloadWrapper(ActivationWrapper, TorchOffloadWrapper):
    """Keeps the activations that the wrapped module saves for backward in CPU memory.

    Parameters, buffers (and views of either), tensors already on the CPU and tensors below
    ``min_offload_bytes`` are never copied; tensor subclasses such as DTensor are copied at their
    local shape (see :mod:`fsdp_ac.offload`).

    Args:
        mod: The module to wrap.
        pin_memory: Offload into page-locked memory (for tensors on a CUDA device).
        min_offload_bytes: Saved tensors whose storage is smaller than this stay on their device.
        copy_cpu_tensors: Also copy saved tensors already in CPU memory, into separate CPU memory.
            It frees nothing: it lets tests on machines without an accelerator run offloading for
            real (:attr:`fsdp_ac.offload.OffloadOptions.copy_cpu_tensors`).
        engine: An :class:`~fsdp_ac.offload.OffloadEngine`, shared by a model's offload wrappers,
            that copies on a side stream into a reused host pool and prefetches in backward; None
            (the default) copies synchronously, as torch's wrapper does.
        region_name: See :class:`ActivationWrapper`.

    Raises:
        ValueError: ``min_offload_bytes`` is negative.
    """

    engine: OffloadEngine | None = None
    """The engine that copies, or None for synchronous copies."""

    def __init__(
        self,
        mod: nn.Module,
        *,
        pin_memory: bool = True,
        min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
        copy_cpu_tensors: bool = False,
        engine: OffloadEngine | None = None,
        region_name: str | None = None,
    ) -> None:
        ActivationWrapper.__init__(self, mod, region_name=region_name)
        options = OffloadOptions(pin_memory, min_offload_bytes, copy_cpu_tensors)
        self.pin_memory = options.pin_memory
        self.min_offload_bytes = options.min_offload_bytes
        self.copy_cpu_tensors = options.copy_cpu_tensors
        self.engine = engine

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped module with its saved activations offloaded."""
        wrapped: nn.Module = getattr(self, WRAPPED_MODULE_ATTR)
        if not torch.is_grad_enabled():
            return wrapped(*args, **kwargs)
        with offload_saved_tensors(
            wrapped,
            pin_memory=self.pin_memory,
            min_offload_bytes=self.min_offload_bytes,
            copy_cpu_tensors=self.copy_cpu_tensors,
            engine=self.engine,
        ):
            return wrapped(*args, **kwargs)


def checkpoint_wrapper(
    module: nn.Module,
    checkpoint_impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT,
    checkpoint_fn: Callable[..., Any] | None = None,
    *,
    allow_rng_divergence: bool = False,
    check_recomputed_values: bool = False,
    offload: OffloadOptions | None = None,
    engine: OffloadEngine | None = None,
    **checkpoint_fn_kwargs: Any,
) -> nn.Module:
    """Wraps ``module`` so that every training call recomputes its activations in backward.

    Wrapping is idempotent: a module that already is a checkpoint wrapper (fsdp_ac's or torch's),
    directly or under offload wrappers, is returned as it is when the settings agree.

    Args:
        module: The module to wrap.
        checkpoint_impl: ``CheckpointImpl.NO_REENTRANT`` (default) or ``CheckpointImpl.REENTRANT``.
        checkpoint_fn: A functional checkpoint to use instead of ``torch.utils.checkpoint.checkpoint``;
            ``checkpoint_impl`` is then ignored.
        allow_rng_divergence: See :class:`CheckpointWrapper`.
        check_recomputed_values: See :class:`CheckpointWrapper`.
        offload: Also offload the inputs the checkpoint keeps (see :class:`CheckpointWrapper`).
        engine: The :class:`~fsdp_ac.offload.OffloadEngine` that copies for ``offload``.
        **checkpoint_fn_kwargs: Passed to the checkpoint function, e.g. ``context_fn``.

    Returns:
        A :class:`CheckpointWrapper` around ``module``, or ``module`` if it is checkpointed already.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` instance (the message says what it is), or
            see :class:`CheckpointWrapper`.
        ValueError: ``module`` is checkpointed already with other settings, or has Hugging Face
            gradient checkpointing enabled.

    Example:
        >>> block = checkpoint_wrapper(nn.Linear(8, 8))
        >>> [name for name, _ in block.named_parameters()]
        ['weight', 'bias']
    """
    require_module(module, "checkpoint_wrapper")
    existing = next((m for m in activation_wrappers(module) if isinstance(m, TorchCheckpointWrapper)), None)
    if existing is not None:
        return _reuse_checkpoint_wrapper(
            module, existing, (checkpoint_impl, offload, engine), checkpoint_fn, checkpoint_fn_kwargs
        )
    refuse_hf_gradient_checkpointing(module, type(module).__name__)
    return CheckpointWrapper(
        module,
        checkpoint_impl,
        checkpoint_fn,
        allow_rng_divergence=allow_rng_divergence,
        check_recomputed_values=check_recomputed_values,
        offload=offload,
        engine=engine,
        **checkpoint_fn_kwargs,
    )


def offload_wrapper(
    module: nn.Module,
    *,
    pin_memory: bool = True,
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
    copy_cpu_tensors: bool = False,
    engine: OffloadEngine | None = None,
) -> nn.Module:
    """Wraps ``module`` so that the activations it saves for backward live in CPU memory.

    Compose with :func:`checkpoint_wrapper` (``offload_wrapper(checkpoint_wrapper(m))``) to offload
    only the checkpointed block's inputs. Wrapping an offload wrapper again returns it as it is.

    Args:
        module: The module to wrap.
        pin_memory: Offload into page-locked memory (for tensors on a CUDA device).
        min_offload_bytes: Saved tensors whose storage is smaller than this stay on their device.
        copy_cpu_tensors: Also copy saved tensors already in CPU memory (frees nothing; for tests on
            machines without an accelerator, see :class:`OffloadWrapper`).
        engine: An :class:`~fsdp_ac.offload.OffloadEngine` to copy asynchronously (pass the same one
            to every block of a model, so that backward prefetches across blocks); None copies
            synchronously.

    Returns:
        An :class:`OffloadWrapper` around ``module``, or ``module`` if it is one already with the
        same settings.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` instance (the message says what it is).
        ValueError: ``min_offload_bytes`` is negative, or ``module`` is offloaded already with other
            settings.

    Example:
        >>> block = offload_wrapper(nn.Linear(8, 8))
        >>> block(torch.randn(2, 8)).sum().backward()
    """
    require_module(module, "offload_wrapper")
    if isinstance(module, TorchOffloadWrapper):
        wanted = (pin_memory, min_offload_bytes, copy_cpu_tensors, engine)
        if isinstance(module, OffloadWrapper) and wanted != (
            module.pin_memory,
            module.min_offload_bytes,
            module.copy_cpu_tensors,
            module.engine,
        ):
            raise ValueError(
                f"{type(unwrap(module)).__name__} is already wrapped for offloading with other settings "
                "(pin_memory, min_offload_bytes, copy_cpu_tensors or engine); offloading it twice would "
                "copy twice. Call fsdp_ac.unwrap(module) first, or keep the existing wrapper."
            )
        return module
    return OffloadWrapper(
        module,
        pin_memory=pin_memory,
        min_offload_bytes=min_offload_bytes,
        copy_cpu_tensors=copy_cpu_tensors,
        engine=engine,
    )


def require_module(value: Any, caller: str) -> None:
    """Raises a ``TypeError`` that says what was passed instead of a module instance, and the fix."""
    if isinstance(value, nn.Module):
        return
    if isinstance(value, type) and issubclass(value, nn.Module):
        got, fix = f"the class {value.__name__}", f"pass an instance, e.g. {caller}({value.__name__}(...))"
    elif isinstance(value, torch.Tensor):
        got, fix = "a Tensor", "pass the module that computes it"
    elif callable(value):
        got = f"the callable {getattr(value, '__qualname__', type(value).__name__)}"
        if "offload" in caller.lower():
            fix = "to offload a function's activations, run it under torch.autograd.graph.save_on_cpu()"
        else:
            fix = "to checkpoint a function, call torch.utils.checkpoint.checkpoint(fn, *args)"
    else:
        got, fix = f"{type(value).__name__} {value!r:.60}", "pass the nn.Module to wrap"
    raise TypeError(f"{caller} takes an nn.Module instance, got {got}: {fix}.")


def _reuse_checkpoint_wrapper(
    module: nn.Module,
    existing: nn.Module,
    settings: tuple[CheckpointImpl, OffloadOptions | None, OffloadEngine | None],
    checkpoint_fn: Callable[..., Any] | None,
    checkpoint_fn_kwargs: dict[str, Any],
) -> nn.Module:
    existing_fn, existing_kwargs = checkpoint_function(existing)
    existing_kwargs.pop("use_reentrant", None)
    existing_settings = tuple(getattr(existing, n, None) for n in ("checkpoint_impl", "offload", "engine"))
    same = (
        existing_settings == settings
        and checkpoint_fn is None
        and existing_fn is _torch_checkpoint
        and existing_kwargs == checkpoint_fn_kwargs
    )
    if not same:
        raise ValueError(
            f"{type(unwrap(module)).__name__} is already wrapped for activation checkpointing with "
            "other settings; checkpointing it twice would recompute twice. Call fsdp_ac.unwrap(module) "
            "first, or keep the existing wrapper."
        )
    return module


def refuse_hf_gradient_checkpointing(module: nn.Module, where: str) -> None:
    """Raises a ``ValueError`` when Hugging Face's own checkpointing is on in ``module``.

    Inside an fsdp_ac region it would recompute every layer twice.
    """
    for name, sub in module.named_modules():
        if getattr(sub, "gradient_checkpointing", False) is True:
            location = f"'{name}' ({type(sub).__name__})" if name else type(sub).__name__
            raise ValueError(
                f"Hugging Face gradient checkpointing is enabled on {location} inside {where}; with "
                "fsdp_ac's checkpointing too, every layer would be recomputed twice. Call "
                "model.gradient_checkpointing_disable() (or leave gradient_checkpointing off in the "
                "TrainingArguments/config) and let fsdp_ac do the checkpointing."
            )


def _adapt_dcp_to_fsdp1_inside(wrapper: ActivationWrapper, module: Any) -> None:
    """``CheckpointWrapper(FSDP(block))`` trains; DCP restores its optimizer state once adapted."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(module, FullyShardedDataParallel):
        from fsdp_ac.dcp import adapt_dcp_names

        adapt_dcp_names(wrapper.region_name, ActivationWrapper)


def _refuse_stateful_cache(region_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A key/value cache the region appends to would be appended to again by the replay."""
    for value in (*args, *kwargs.values()):
        if _is_hugging_face_cache(type(value)):
            raise ValueError(
                f"Checkpointed region '{region_name}' was called with a Hugging Face "
                f"{type(value).__name__}; its recomputation in backward would append to the cache a "
                "second time. Train with use_cache=False (model(..., use_cache=False) or "
                "model.config.use_cache = False)."
            )


def _is_hugging_face_cache(cls: type) -> bool:
    return cls.__name__.endswith("Cache") and cls.__module__.startswith("transformers")


@dataclasses.dataclass
class _Flat:
    """A nesting of Python containers with its tensors taken out, to rebuild it later."""

    rebuild: Callable[[Iterator[torch.Tensor]], Any]
    tensors: list[torch.Tensor]


def _flatten(value: Any) -> _Flat:
    """Takes the tensors out of tuples, lists, namedtuples, dicts and dataclasses, recursively.

    The rebuild closures hold container types and skeletons, never the tensors: the reentrant
    checkpoint node holds them, and a tensor held there would keep its own graph alive in a cycle.
    """
    tensors: list[torch.Tensor] = []
    return _Flat(_take(value, tensors), tensors)


def _take(node: Any, tensors: list[torch.Tensor]) -> Callable[[Iterator[torch.Tensor]], Any]:
    """Appends the tensors in ``node`` to ``tensors``; returns how to rebuild ``node`` from them.

    A module-level function, not a closure: a recursive closure refers to itself, and the cycle
    would keep ``tensors`` (and so a region's outputs and their graph) alive until a GC pass.
    """
    if isinstance(node, torch.Tensor):
        tensors.append(node)
        return next
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        names = [f.name for f in dataclasses.fields(node) if f.init]
        parts = [_take(getattr(node, name), tensors) for name in names]
        skeleton = copy.copy(node)
        for name in names:
            object.__setattr__(skeleton, name, None)
        return lambda it: dataclasses.replace(
            skeleton,
            **{n: p(it) for n, p in zip(names, parts, strict=True)},
        )
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        cls, parts = type(node), [_take(v, tensors) for v in node]
        return lambda it: cls(*(p(it) for p in parts))
    if isinstance(node, (tuple, list)):
        sequence_cls, items = type(node), [_take(v, tensors) for v in node]
        return lambda it: sequence_cls(p(it) for p in items)
    if isinstance(node, dict):
        keys = list(node)
        parts = [_take(node[k], tensors) for k in keys]
        empty = copy.copy(node)
        empty.clear()
        return lambda it: _rebuild_dict(empty, {k: p(it) for k, p in zip(keys, parts, strict=True)})
    return lambda it: node


def _rebuild_dict(skeleton: dict[Any, Any], values: dict[Any, Any]) -> dict[Any, Any]:
    rebuilt = copy.copy(skeleton)
    rebuilt.update(values)
    return rebuilt


def _reentrant_call(
    checkpoint_fn: Callable[..., Any],
    region: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Runs reentrant checkpointing with any inputs and outputs, training even frozen-input regions.

    Reentrant checkpointing sees only positional tensor arguments and returns only tensors, and it
    builds no graph when no input needs a gradient, which silently leaves the region untrained. So
    inputs and outputs travel as flat tuples of tensors, with one empty tensor that needs a gradient.
    Under DDP the region's trainable parameters travel as inputs too (see :class:`_RoutedParameters`).
    """
    inputs = _flatten((args, kwargs))
    module = region.module if isinstance(region, RecomputeRegion) else region
    routed = _RoutedParameters.of(module) if isinstance(module, nn.Module) else None
    params = routed.params if routed is not None else ()
    n_inputs = len(inputs.tensors)
    # Only the rebuild closure is kept: holding the output tensors here would keep their graph alive.
    output_rebuild: list[Callable[[Iterator[torch.Tensor]], Any]] = []

    def run(_anchor: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        call_args, call_kwargs = inputs.rebuild(iter(tensors[:n_inputs]))
        # A plain context where nothing is routed keeps a compiled region one graph.
        with routed.replaced(tensors[n_inputs:]) if routed is not None else contextlib.nullcontext():
            flat = _flatten(region(*call_args, **call_kwargs))
        if not output_rebuild:
            output_rebuild.append(flat.rebuild)
        return tuple(flat.tensors)

    anchor = torch.empty(0, requires_grad=True)
    out_tensors = checkpoint_fn(run, anchor, *inputs.tensors, *params)
    if isinstance(out_tensors, torch.Tensor):
        out_tensors = (out_tensors,)
    return output_rebuild[0](iter(out_tensors))


_ROUTING_PARAMETERS: ContextVar[bool] = ContextVar("fsdp_ac_routing_parameters", default=False)
"""True while a region whose parameters are routed replays: a reentrant region nested in it routes too."""


@dataclasses.dataclass
class _RoutedParameters:
    """A reentrant region's trainable parameters under DDP, passed through the checkpoint as inputs.

    Reentrant recomputation runs the region's backward as a nested backward call, in which each
    parameter's gradient accumulator, where DDP's reducer hooks sit, runs on its own. DDP expects one
    hook call per parameter per step: a parameter also used outside the region (tied embeddings), a
    region run twice, two forwards or ``find_unused_parameters=True`` broke it, and a use outside the
    region after DDP had finished the step left that gradient unsynchronized across ranks. As inputs
    of the checkpoint, the parameters are replaced in the replay by the checkpoint's detached copies;
    the copies' gradients come back as its input gradients, and autograd sums them with every other
    use of the parameter into one accumulation, exactly as without AC.
    """

    params: tuple[torch.Tensor, ...]
    """Each trainable parameter once, tied ones included (plain tensors in a nested region's replay)."""
    slots: list[tuple[dict[str, Any], str, int]]
    """Where the region's modules hold them: ``(module._parameters, name, index into params)``."""

    @classmethod
    def of(cls, module: nn.Module) -> _RoutedParameters | None:
        """The routing for a call of ``module`` in DDP's forward or in a routed region's replay.

        None elsewhere, and under compile, where the replay is part of the compiled backward graph
        and no nested backward runs.
        """
        if torch.compiler.is_compiling() or not (
            _ROUTING_PARAMETERS.get() or active_ddp_module() is not None
        ):
            return None
        index: dict[int, int] = {}
        params: list[torch.Tensor] = []
        slots: list[tuple[dict[str, Any], str, int]] = []
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is None or not param.requires_grad:
                    continue
                if id(param) not in index:
                    index[id(param)] = len(params)
                    params.append(param)
                slots.append((sub._parameters, name, index[id(param)]))
        return cls(tuple(params), slots) if params else None

    @contextlib.contextmanager
    def replaced(self, tensors: tuple[torch.Tensor, ...]) -> Iterator[None]:
        """Puts ``tensors`` in the parameters' slots meanwhile, unless they are the parameters.

        In the forward they are the parameters; in the replay, the checkpoint's detached copies.
        """
        if all(new is old for new, old in zip(tensors, self.params, strict=True)):
            yield
            return
        saved = [(slots, name, slots[name]) for slots, name, _ in self.slots]
        token = _ROUTING_PARAMETERS.set(True)
        try:
            for slots, name, position in self.slots:
                slots[name] = tensors[position]
            yield
        finally:
            for slots, name, value in saved:
                slots[name] = value
            _ROUTING_PARAMETERS.reset(token)
