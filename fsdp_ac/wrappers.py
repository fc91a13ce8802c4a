"""Drop-in activation checkpointing and offloading wrappers.

Names, parameter order and defaults are those of torch's ``checkpoint_wrapper`` (torch 2.13), and the
classes subclass torch's, so FSDP and DCP treat them as torch's own. What differs (clean names, the
replay rule, reentrant regions that train under DDP) is in docs/differences.md and docs/names.md.
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
    TorchActivationWrapper,
    TorchCheckpointWrapper,
    TorchOffloadWrapper,
    active_ddp_module,
    checkpoint_function,
)
from fsdp_ac._compat import CheckpointImpl as CheckpointImpl  # re-exported
from fsdp_ac.names import (
    activation_wrappers,
    clean_load_report,
    restore_prefix_on_load,
    strip_prefix_on_save,
    unwrap,
)
from fsdp_ac.offload import DEFAULT_MIN_OFFLOAD_BYTES, OffloadEngine, OffloadOptions, offload_saved_tensors
from fsdp_ac.recompute import RecomputeRegion, has_user_hooks

_REGION_NAME: ContextVar[str | None] = ContextVar("fsdp_ac_region_name", default=None)


@contextlib.contextmanager
def naming_regions(name: str) -> Iterator[None]:
    """Wrappers built inside this context take ``name`` as their ``region_name``.

    How :mod:`fsdp_ac.apply` names the wrappers a user's ``checkpoint_wrapper_fn(module)`` builds.
    """
    token = _REGION_NAME.set(name)
    try:
        yield
    finally:
        _REGION_NAME.reset(token)


_CONSTRUCTING = "_fsdp_ac_constructing"  # in a wrapper's __dict__ until its __init__ chain returns


class _Constructed(abc.ABCMeta):  # ABCMeta: torch's wrappers are ABCs
    """Marks a wrapper constructed once its outermost ``__init__`` returns (a subclass's runs on)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        wrapper = super().__call__(*args, **kwargs)
        wrapper.__dict__.pop(_CONSTRUCTING, None)
        return wrapper


class ActivationWrapper(TorchActivationWrapper, metaclass=_Constructed):
    """Base class of the checkpoint and offload wrappers; not meant to be instantiated directly.

    The wrapped module lives at ``self._checkpoint_wrapped_module``; attribute reads and writes the
    wrapper does not own, ``len()``, iteration and indexing reach it. In ``named_modules()`` the
    wrapper and the wrapped module share one clean name (docs/names.md).

    Args:
        mod: The module to wrap.
        region_name: The region's name in messages; default: the one :func:`naming_regions` gives,
            else the wrapped module's class name.

    Raises:
        TypeError: ``mod`` is not an ``nn.Module``.
        ValueError: ``mod`` is an FSDP1 unit and DCP cannot be adapted (:func:`fsdp_ac.dcp.adapt_dcp_names`).
    """

    region_name: str

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

        The wrapper owns what is set during construction, private names, and what it already has or
        its class defines: so ``wrapper.dropout_p = 0.0`` reaches the wrapped module.

        Raises:
            ValueError: FSDP1 auto-wrap put an FSDP unit inside and DCP cannot be adapted
                (:func:`fsdp_ac.dcp.adapt_dcp_names`).
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

    def __bool__(self) -> bool:  # as any module, although it has __len__
        return True

    def __len__(self) -> int:
        return len(self._modules[WRAPPED_MODULE_ATTR])  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._modules[WRAPPED_MODULE_ATTR])  # type: ignore[call-overload]

    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        """Yields this wrapper, then the wrapped module's ``named_modules()``, under one clean name.

        The wrapped module comes second, so ``dict(model.named_modules())`` is the unwrapped model's.
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
        """``nn.Module.named_parameters``: torch's wrapper override would rewrite clean names again."""
        return nn.Module.named_parameters(self, prefix, recurse, remove_duplicate)


class CheckpointWrapper(ActivationWrapper, TorchCheckpointWrapper):
    """Recomputes the wrapped module's activations in backward instead of saving them.

    Every call autograd records is checkpointed, in eval mode too (RL and LoRA runs call ``.eval()``
    and still backpropagate); calls without autograd run the module directly. The replay follows the
    replay rule of :mod:`fsdp_ac.recompute`.

    Args:
        mod: The module to wrap.
        checkpoint_impl: ``CheckpointImpl.NO_REENTRANT`` (default) or ``CheckpointImpl.REENTRANT``;
            ignored when ``checkpoint_fn`` is given.
        checkpoint_fn: A functional checkpoint to use instead of ``torch.utils.checkpoint.checkpoint``.
        allow_rng_divergence: With ``preserve_rng_state=False``, allow random ops in the region.
        check_recomputed_values: Compare every recomputed saved tensor with the forward's, bitwise,
            and raise on a difference (a debugging aid: it keeps a copy of each saved tensor).
        offload: Also keep the checkpoint's inputs in CPU memory: ``offload_wrapper(checkpoint_wrapper(m))``
            in one wrapper, which an FSDP1 unit without ``use_orig_params`` can hold.
        engine: The :class:`~fsdp_ac.offload.OffloadEngine` that copies for ``offload``; None copies
            synchronously.
        region_name: See :class:`ActivationWrapper`.
        **checkpoint_fn_kwargs: Passed to the checkpoint function on every call.

    Raises:
        TypeError: ``checkpoint_impl`` is not a ``CheckpointImpl``, or ``use_reentrant`` is passed.
    """

    offload: OffloadOptions | None = None
    engine: OffloadEngine | None = None

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
        reentrant = checkpoint_impl == CheckpointImpl.REENTRANT
        self.checkpoint_fn: partial[Any]
        if checkpoint_fn is None:
            if "use_reentrant" in checkpoint_fn_kwargs:
                raise TypeError(
                    "Pass checkpoint_impl=CheckpointImpl.REENTRANT or NO_REENTRANT instead of "
                    "use_reentrant; checkpoint_wrapper sets use_reentrant from checkpoint_impl."
                )
            self.checkpoint_fn = partial(_torch_checkpoint, use_reentrant=reentrant, **checkpoint_fn_kwargs)
        else:
            self.checkpoint_fn = partial(checkpoint_fn, **checkpoint_fn_kwargs)
        self._uses_torch_reentrant = checkpoint_fn is None and reentrant
        # The region's audit checks saved tensors unless the user chose torch's check themselves;
        # with torch's non-reentrant checkpoint it replaces torch's check of the same metadata.
        self._audit_saved_tensors = "determinism_check" not in checkpoint_fn_kwargs
        self._replaces_torch_check = self._audit_saved_tensors and checkpoint_fn is None and not reentrant
        self._checked_first_forward = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped module under the checkpoint function (directly when autograd is off)."""
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
            # Else the replay is part of the compiled backward; the region's bookkeeping would break it.
            if self._uses_torch_reentrant:
                return _reentrant_call(self.checkpoint_fn, wrapped, args, kwargs)
            return self.checkpoint_fn(wrapped, *args, **kwargs)
        return self._checkpoint(wrapped, args, kwargs)

    def _checkpoint(self, wrapped: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self._checked_first_forward:
            refuse_hf_gradient_checkpointing(wrapped, self.region_name)
            self._checked_first_forward = True
        _refuse_stateful_cache(self.region_name, args, kwargs)
        guard = (
            not self.checkpoint_fn.keywords.get("preserve_rng_state", True) and not self.allow_rng_divergence
        )
        audit, check_values = self._audit_saved_tensors, self.check_recomputed_values
        region = RecomputeRegion(
            wrapped, self.region_name, guard_random_ops=guard, audit=audit, check_values=check_values
        )
        if self._uses_torch_reentrant:
            return _reentrant_call(self.checkpoint_fn, region, args, kwargs)
        if self._replaces_torch_check:
            # The region's audit names the region on a mismatch; torch's check would repeat it.
            return self.checkpoint_fn(region, *args, determinism_check="none", **kwargs)
        return self.checkpoint_fn(region, *args, **kwargs)


@torch.compiler.disable  # type: ignore[untyped-decorator]
def _checkpoint_eagerly(
    wrapper: CheckpointWrapper, wrapped: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return wrapper._checkpoint(wrapped, args, kwargs)


class OffloadWrapper(ActivationWrapper, TorchOffloadWrapper):
    """Keeps the activations that the wrapped module saves for backward in CPU memory.

    Which tensors move is :func:`fsdp_ac.offload.decide`'s (docs/offload.md).

    Args:
        mod: The module to wrap.
        pin_memory: See :func:`fsdp_ac.offload.offload_saved_tensors`.
        min_offload_bytes: See :func:`fsdp_ac.offload.offload_saved_tensors`.
        copy_cpu_tensors: See :func:`fsdp_ac.offload.offload_saved_tensors`.
        engine: An :class:`~fsdp_ac.offload.OffloadEngine` shared by a model's offload wrappers; None
            copies synchronously, as torch's wrapper does.
        region_name: See :class:`ActivationWrapper`.

    Raises:
        ValueError: ``min_offload_bytes`` is negative.
    """

    engine: OffloadEngine | None = None

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
        with offload_saved_tensors(wrapped, **dataclasses.asdict(_options(self)), engine=self.engine):
            return wrapped(*args, **kwargs)


def _options(wrapper: OffloadWrapper) -> OffloadOptions:
    return OffloadOptions(wrapper.pin_memory, wrapper.min_offload_bytes, wrapper.copy_cpu_tensors)


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

    Idempotent: a module checkpointed already (by fsdp_ac or torch, under offload wrappers too) with
    the same settings is returned as it is. Arguments as for :class:`CheckpointWrapper`.

    Returns:
        A :class:`CheckpointWrapper` around ``module``, or ``module`` if it is checkpointed already.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` instance, or see :class:`CheckpointWrapper`.
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
        existing_fn, existing_kwargs = checkpoint_function(existing)
        existing_kwargs.pop("use_reentrant", None)
        settings = tuple(getattr(existing, n, None) for n in ("checkpoint_impl", "offload", "engine"))
        same = settings == (checkpoint_impl, offload, engine) and existing_kwargs == checkpoint_fn_kwargs
        if not (same and checkpoint_fn is None and existing_fn is _torch_checkpoint):
            raise ValueError(
                f"{type(unwrap(module)).__name__} is already wrapped for activation checkpointing with "
                "other settings; checkpointing it twice would recompute twice. Call fsdp_ac.unwrap(module) "
                "first, or keep the existing wrapper."
            )
        return module
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

    ``offload_wrapper(checkpoint_wrapper(m))`` offloads only the checkpointed block's inputs.
    Arguments as for :class:`OffloadWrapper` (pass one engine to every block of a model).

    Returns:
        An :class:`OffloadWrapper` around ``module``, or ``module`` if it is one already with the
        same settings.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` instance.
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
            *dataclasses.astuple(_options(module)),
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


def refuse_hf_gradient_checkpointing(module: nn.Module, where: str) -> None:
    """Raises a ``ValueError`` when Hugging Face's own checkpointing (a second recompute) is on."""
    for name, sub in module.named_modules():
        if getattr(sub, "gradient_checkpointing", False) is True:
            location = f"'{name}' ({type(sub).__name__})" if name else type(sub).__name__
            raise ValueError(
                f"Hugging Face gradient checkpointing is enabled on {location} inside {where}; with "
                "fsdp_ac's checkpointing too, every layer would be recomputed twice. Call "
                "model.gradient_checkpointing_disable() (or leave it off in the TrainingArguments)."
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
                "second time. Train with use_cache=False (or model.config.use_cache = False)."
            )


def _is_hugging_face_cache(cls: type) -> bool:
    return cls.__name__.endswith("Cache") and cls.__module__.startswith("transformers")


@dataclasses.dataclass
class _Flat:
    rebuild: Callable[[Iterator[torch.Tensor]], Any]
    tensors: list[torch.Tensor]


def _flatten(value: Any) -> _Flat:
    """Takes the tensors out of tuples, lists, namedtuples, dicts and dataclasses, recursively.

    The rebuild closures never hold the tensors: held there, a tensor would keep its graph alive.
    """
    tensors: list[torch.Tensor] = []
    return _Flat(_take(value, tensors), tensors)


def _take(node: Any, tensors: list[torch.Tensor]) -> Callable[[Iterator[torch.Tensor]], Any]:
    """Appends the tensors in ``node`` to ``tensors``; returns how to rebuild ``node`` from them.

    Not a closure: a recursive closure's cycle would keep ``tensors`` alive until a GC pass.
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

    Inputs and outputs travel as flat tuples of tensors, with one empty tensor that needs a gradient
    (else no graph is built); under DDP the parameters too (docs/differences.md, row 2).
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


# True while a routed region replays: a reentrant region nested in it routes too.
_ROUTING_PARAMETERS: ContextVar[bool] = ContextVar("fsdp_ac_routing_parameters", default=False)


@dataclasses.dataclass
class _RoutedParameters:
    """A reentrant region's trainable parameters under DDP, passed through the checkpoint as inputs.

    So autograd accumulates each parameter's gradient, and DDP's hook fires, once per step as
    without AC (docs/differences.md, row 2).
    """

    params: tuple[torch.Tensor, ...]  # each once, tied ones included
    slots: list[tuple[dict[str, Any], str, int]]  # (module._parameters, name, index into params)

    @classmethod
    def of(cls, module: nn.Module) -> _RoutedParameters | None:
        """The routing for a call of ``module`` in DDP's forward or a routed replay, else None."""
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
        """Puts ``tensors`` (the replay's detached copies) in the parameters' slots meanwhile."""
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
