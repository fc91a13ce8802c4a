"""Every private torch and Accelerate internal fsdp_ac relies on, in one place.

fsdp_ac subclasses torch's activation wrappers, reads FSDP1's flat parameters, adapts DCP's name walk
and routes Accelerate's ``prepare``; all of that rests on names neither project promises to keep. Each
one is reached only through this module, as a named alias or a small function with a comment saying
what it is for and the releases it was checked on, and ``tests/test_compat.py`` checks each one
against the installed torch and Accelerate, failing with the internal's name and the module that uses
it when an upgrade removes or changes it. ``tests/test_layers.py`` fails when any other module of the
package imports a private torch or Accelerate module or reaches a private internal directly.

The rule, and its one exception: ``nn.Module``'s own containers (``_modules``, ``_parameters``,
``_buffers``, ``_forward_hooks``, ``_forward_pre_hooks``) and ``Tensor._version``/``Tensor._base``
are used in place, as by every PyTorch library: they are stable in practice, and routing each use
through a function would hide what the walks and mutation checks do. Accelerate's public API
(``Accelerator``, ``DistributedType``, ``FullyShardedDataParallelPlugin()``) is called in place too;
its plugin's fields, which fsdp_ac reads and writes, and the methods :func:`fsdp_ac.accelerate.enable`
replaces, are here.

This module is a leaf: it imports nothing from fsdp_ac. Accelerate is imported only inside the
functions that need it, so fsdp_ac imports without it.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._ops import OpOverload, OpOverloadPacket
from torch.distributed._composable_state import _State
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as _torch_wrappers
from torch.distributed.checkpoint import state_dict as _dcp_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import CustomPolicy, _Policy
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

__all__ = [
    "CHECKED_ACCELERATE",
    "CHECKED_TORCH",
    "DCP_FQN_WALK_PARAMETERS",
    "FSDP1_WRAPPED_ATTR",
    "ROUTED_ACCELERATOR_METHODS",
    "WRAPPED_MODULE_ATTR",
    "CheckpointImpl",
    "ComposableState",
    "CustomPolicy",
    "FsdpPolicy",
    "NormBase",
    "OpOverload",
    "OpOverloadPacket",
    "FsdpTargetsPolicy",
    "StorageWeakRef",
    "TorchActivationWrapper",
    "TorchCheckpointWrapper",
    "TorchDispatchMode",
    "TorchOffloadWrapper",
    "TransparentSavedTensorsHooks",
    "accelerate_differences",
    "accelerator_fsdp_plugin",
    "active_ddp_module",
    "checkpoint_function",
    "compiled_original",
    "custom_policy_fields",
    "dcp_fqn_walk",
    "flat_parameter_modules",
    "hf_no_split_modules",
    "is_traceable_wrapper_subclass",
    "plugin_checkpointing",
    "plugin_fsdp_version",
    "plugin_wrap_policy",
    "replace_dcp_fqn_walk",
    "run_fsdp_policy",
    "saved_tensors_hooks_in_scope",
    "set_plugin_checkpointing",
    "storage_from_weak_ref",
    "tree_leaves",
    "uses_flat_parameters",
]

CHECKED_TORCH = ("2.13.0", "2.14.1")
"""The torch releases every internal here was checked on (CI's torch range)."""
CHECKED_ACCELERATE = ("1.15.0", "1.16.0")
"""The Accelerate releases every Accelerate internal here was checked on (setup.cfg's lower bound and
the newest, both run by CI)."""

# --- torch's activation wrappers (torch 2.13.0, 2.14.1) -------------------------------------------

# Base classes of fsdp_ac's wrappers: FSDP1, FSDP2 and DCP recognise wrappers by these types.
TorchActivationWrapper = _torch_wrappers.ActivationWrapper
TorchCheckpointWrapper = _torch_wrappers.CheckpointWrapper
TorchOffloadWrapper = _torch_wrappers.OffloadWrapper
# torch's enum, so members imported from either package are the same.
CheckpointImpl = _torch_wrappers.CheckpointImpl
# Where a wrapper keeps its module; FSDP1, DCP and torch's state-dict hooks key off this name.
WRAPPED_MODULE_ATTR = "_checkpoint_wrapped_module"
# Where an FSDP1 unit keeps its module.
FSDP1_WRAPPED_ATTR = "_fsdp_wrapped_module"


def checkpoint_function(wrapper: nn.Module) -> tuple[Callable[..., Any] | None, dict[str, Any]]:
    """A checkpoint wrapper's checkpoint function and its bound keywords (torch 2.13.0, 2.14.1).

    torch's ``CheckpointWrapper`` keeps ``checkpoint_fn`` as a ``functools.partial`` of the function
    with ``use_reentrant`` and the user's keywords; fsdp_ac's keeps the same shape.
    """
    fn = getattr(wrapper, "checkpoint_fn", None)
    return getattr(fn, "func", None), dict(getattr(fn, "keywords", {}))


# --- autograd, dispatch, pytree (torch 2.13.0, 2.14.1) --------------------------------------------

# Also from here, imported above from torch.utils._python_dispatch, torch.utils._pytree and
# torch._ops: TorchDispatchMode (memory meter, selective checkpointing), is_traceable_wrapper_subclass
# (DTensor-like saved tensors), tree_leaves (flattening arguments), OpOverload(Packet) (operators).
# A norm layer's running statistics, which CPU kernels update without bumping their version.
NormBase = _NormBase
# The state of composable distributed APIs (FSDP2, tensor parallel): their hooks are bound to it.
ComposableState = _State


def saved_tensors_hooks_in_scope() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """The innermost saved-tensor (pack, unpack) hooks in scope, or None (torch 2.13.0, 2.14.1).

    Inside torch's non-reentrant checkpoint these are checkpoint's own; the replay audit delegates to them.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return None if hooks is None else (hooks[0], hooks[1])


class TransparentSavedTensorsHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that selective checkpointing looks through to the hooks they delegate to.

    From torch 2.14, selective checkpointing asks for the saved-tensor hooks in scope (the user's,
    e.g. offloading) when it saves an op's output outside the autograd graph; it skips checkpoint's
    own hooks, marked ``_checkpoint_internal`` and pointing at the hooks below them (``_user_hooks``,
    present only while pushed). Unmarked, hooks layered over checkpoint's count as a user's: every
    selective region warns (FutureWarning), and with ``respect_saved_tensors_hooks=True`` their saves
    go through checkpoint's own pack and backward fails. Checked on torch 2.14.1; 2.13.0 reads neither.
    """

    def __init__(
        self, pack: Callable[[torch.Tensor], Any], outer: tuple[Callable[..., Any], Callable[..., Any]]
    ) -> None:
        super().__init__(pack, outer[1])
        self._outer = outer

    def __enter__(self) -> None:
        self.pack_hook._checkpoint_internal = True  # type: ignore[attr-defined]
        self.pack_hook._user_hooks = self._outer  # type: ignore[attr-defined]
        super().__enter__()

    def __exit__(self, *args: object) -> None:
        # The autograd graph keeps the pack hook: a lasting reference would keep the hooks below alive.
        del self.pack_hook._user_hooks  # type: ignore[attr-defined]
        super().__exit__(*args)


def storage_from_weak_ref(ref: StorageWeakRef) -> torch.UntypedStorage | None:
    """The storage a ``StorageWeakRef`` points at, for its size; None once freed (torch 2.13.0, 2.14.1)."""
    storage: torch.UntypedStorage | None = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)
    return storage


# --- FSDP1, DDP, DCP, torch.compile (torch 2.13.0, 2.14.1) ----------------------------------------

# FSDP1's auto-wrap policy interface (``ModulePolicy`` is one); ``CustomPolicy`` is public.
FsdpPolicy = _Policy


class FsdpTargetsPolicy(CustomPolicy):
    """A ``CustomPolicy`` whose choice for FSDP1's auto-wrap is :meth:`fsdp_targets`.

    FSDP1 asks a policy through ``_Policy._run_policy(root_module, ignored_modules, root_kwargs)``
    (torch 2.13.0, 2.14.1), which this class answers with :meth:`fsdp_targets`.
    """

    def fsdp_targets(self, root: nn.Module, ignored: frozenset[nn.Module]) -> list[nn.Module]:
        """The modules FSDP1 makes units of (the root excluded)."""
        raise NotImplementedError

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        targets = self.fsdp_targets(root_module, frozenset(ignored_modules))
        return {module: copy.copy(root_kwargs) for module in targets}


def run_fsdp_policy(policy: _Policy, root: nn.Module, ignored: frozenset[nn.Module]) -> set[nn.Module]:
    """The modules an FSDP policy object picks in ``root``, asked as FSDP1 asks (torch 2.13.0, 2.14.1)."""
    return set(policy._run_policy(root, ignored_modules=set(ignored), root_kwargs={}))


def custom_policy_fields(policy: CustomPolicy) -> dict[str, Any]:
    """A ``CustomPolicy``'s fields but the ``_lambda_fn`` its ``__init__`` stores (torch 2.13.0, 2.14.1)."""
    return {key: value for key, value in vars(policy).items() if key != "_lambda_fn"}


def uses_flat_parameters(unit: FullyShardedDataParallel) -> bool:
    """Whether an FSDP1 unit flattens its parameters: ``use_orig_params=False`` (torch 2.13.0, 2.14.1)."""
    return not unit._use_orig_params


def flat_parameter_modules(param: nn.Parameter | None) -> list[nn.Module] | None:
    """The modules whose parameters an FSDP1 flat parameter holds; None for any other parameter.

    A ``FlatParameter`` records them in ``_param_infos`` and ``_shared_param_infos`` (torch 2.13.0, 2.14.1).
    """
    if param is None or not hasattr(param, "_param_infos"):
        return None
    infos = (*param._param_infos, *getattr(param, "_shared_param_infos", ()))
    return [info.module for info in infos]


def active_ddp_module() -> nn.Module | None:
    """The DDP module whose forward is running, if any (torch 2.13.0, 2.14.1)."""
    module: nn.Module | None = DistributedDataParallel._get_active_ddp_module()
    return module


def compiled_original(model: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile``-d model wraps (``_orig_mod``), or None (torch 2.13.0, 2.14.1)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


DCP_FQN_WALK_PARAMETERS = ("model", "name", "dsd_fqn_modifiers", "skip_ddp_prefix", "skip_compiler_prefix")
"""The parameters of DCP's ``_get_fqns`` (torch 2.13.0, 2.14.1); another signature is another walk."""


def dcp_fqn_walk() -> Callable[..., set[str]] | None:
    """DCP's parameter-name walk, ``state_dict._get_fqns``, or None when this torch has none."""
    walk: Callable[..., set[str]] | None = getattr(_dcp_state_dict, "_get_fqns", None)
    return walk


def replace_dcp_fqn_walk(walk: Callable[..., set[str]]) -> None:
    """Makes ``walk`` DCP's ``state_dict._get_fqns``, which its state-dict functions call by that name."""
    _dcp_state_dict._get_fqns = walk


# --- Hugging Face models -------------------------------------------------------------------------


def hf_no_split_modules(model: nn.Module) -> list[str] | None:
    """A Hugging Face model's block class names, ``_no_split_modules`` (transformers 4.x/5.x), if any."""
    names = getattr(model, "_no_split_modules", None)
    return list(names) if names else None


# --- Accelerate (1.15.0, 1.16.0; imported only when called) --------------------------------------

ROUTED_ACCELERATOR_METHODS = {
    "prepare": ["self", "args", "device_placement"],
    "prepare_model": ["self", "model", "device_placement", "evaluation_mode"],
}
"""The ``Accelerator`` methods :func:`fsdp_ac.accelerate.enable` replaces, with their parameters.

Every path to Accelerate's own checkpointing starts at one of them: FSDP1's
``apply_activation_checkpointing`` in ``prepare_model``, FSDP2's ``fsdp2_apply_ac`` in
``_prepare_fsdp2``, which only ``prepare`` calls."""

_PLUGIN_FIELDS = ("activation_checkpointing", "activation_checkpointing_offload", "fsdp_version")


def accelerator_fsdp_plugin(accelerator: Any) -> Any:
    """The FSDP plugin of an accelerator running FSDP: ``accelerator.state.fsdp_plugin``."""
    return accelerator.state.fsdp_plugin


def plugin_checkpointing(plugin: Any) -> tuple[bool, bool]:
    """Whether Accelerate checkpoints blocks, and offloads them (``activation_checkpointing[_offload]``)."""
    return bool(plugin.activation_checkpointing), bool(plugin.activation_checkpointing_offload)


def set_plugin_checkpointing(plugin: Any, checkpointing: bool, offload: bool) -> None:
    """Sets the plugin fields that :func:`plugin_checkpointing` reads."""
    plugin.activation_checkpointing = checkpointing
    plugin.activation_checkpointing_offload = offload


def plugin_fsdp_version(plugin: Any) -> int:
    """The FSDP version (1 or 2) the plugin shards with."""
    return int(plugin.fsdp_version)


def plugin_wrap_policy(plugin: Any, model: nn.Module) -> Callable[..., bool] | None:
    """The auto-wrap policy Accelerate resolves for ``model``, resolved on a copy of the plugin.

    ``set_auto_wrap_policy`` stores it on the plugin as ``auto_wrap_policy`` (None for no wrapping);
    on a copy, reading the policy leaves the plugin as it is.
    """
    resolved = copy.copy(plugin)
    resolved.set_auto_wrap_policy(model)
    policy: Callable[..., bool] | None = resolved.auto_wrap_policy
    return policy


def accelerate_differences() -> list[str]:
    """How the installed Accelerate differs from what the functions above and ``enable`` rely on."""
    import accelerate
    import accelerate.accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    differences = []
    fields = {field.name for field in dataclasses.fields(FullyShardedDataParallelPlugin)}
    differences += [
        f"FullyShardedDataParallelPlugin has no field {f}" for f in _PLUGIN_FIELDS if f not in fields
    ]
    for method in ("set_auto_wrap_policy",):
        if not callable(getattr(FullyShardedDataParallelPlugin, method, None)):
            differences.append(f"FullyShardedDataParallelPlugin has no method {method}")
    if not hasattr(accelerate.accelerator, "fsdp2_apply_ac"):
        differences.append("its FSDP2 checkpointing is not fsdp2_apply_ac")
    for name, parameters in ROUTED_ACCELERATOR_METHODS.items():
        method = inspect.unwrap(getattr(accelerate.Accelerator, name))
        found = list(inspect.signature(method).parameters)
        if found != parameters:
            differences.append(f"Accelerator.{name} takes ({', '.join(found)})")
    return differences
