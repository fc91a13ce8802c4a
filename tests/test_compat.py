"""Every torch and Accelerate internal in ``fsdp_ac/_compat.py`` is there, with the shape fsdp_ac uses.

One row per internal: what it is, the modules that rely on it, and a cheap check of what they rely on.
On an upgrade that removes or changes one, its row fails with the internal's name and its users.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fsdp_ac import _compat


def _hooks_in_checkpoint() -> bool:
    seen = []

    def run(x: torch.Tensor) -> torch.Tensor:
        seen.append(_compat.saved_tensors_hooks_in_scope())
        return x.sin()

    torch.utils.checkpoint.checkpoint(run, torch.ones(2, requires_grad=True), use_reentrant=False)
    return _compat.saved_tensors_hooks_in_scope() is None and all(callable(h) for h in seen[0] or ())


def _transparent_hooks() -> bool:
    outer = (lambda t: t, lambda t: t)
    hooks = _compat.TransparentSavedTensorsHooks(lambda t: t, outer)
    with hooks:
        marked = hooks.pack_hook._checkpoint_internal is True and hooks.pack_hook._user_hooks is outer
    source = inspect.getsource(torch.utils.checkpoint)
    read = torch.__version__ < "2.14" or ("_checkpoint_internal" in source and "_user_hooks" in source)
    return marked and not hasattr(hooks.pack_hook, "_user_hooks") and read


def _fsdp2_state_is_composable() -> bool:
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    return issubclass(FSDPState, _compat.ComposableState)


def _storage_round_trip() -> bool:
    tensor = torch.ones(4)
    storage = _compat.storage_from_weak_ref(_compat.StorageWeakRef(tensor.untyped_storage()))
    return storage is not None and storage.nbytes() == 16


def _uncache_selective_output() -> bool:
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    seen = []

    def policy(ctx: object, *args: object, **kwargs: object) -> CheckpointPolicy:
        seen.append(getattr(ctx, "op_output", None))  # the guard reads what the policy saves here
        return CheckpointPolicy.MUST_SAVE

    caching, cached = create_selective_checkpoint_contexts(policy)
    x = torch.ones(2, requires_grad=True)
    with caching:
        y = x.sin()
    uncached = _compat.uncache_selective_outputs(caching, lambda t: t.untyped_storage() is not None)
    with cached:
        recomputed = x.sin()
    fresh = recomputed.data_ptr() != y.data_ptr() and torch.equal(recomputed, y)
    return bool(seen) and seen[-1] is y and uncached and fresh


def _policy_hooks() -> bool:
    policy = _compat.CustomPolicy(lambda m: isinstance(m, nn.Linear))
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    chosen = _compat.run_fsdp_policy(policy, model, frozenset())
    params = list(inspect.signature(_compat.FsdpPolicy._run_policy).parameters)
    return (
        chosen == {model[0]}
        and "_lambda_fn" not in _compat.custom_policy_fields(policy)
        and params == ["self", "root_module", "ignored_modules", "root_kwargs"]
    )


def _torch_wrapper_shape() -> bool:
    wrapper = _compat.TorchCheckpointWrapper(nn.Linear(2, 2), preserve_rng_state=False)
    fn, keywords = _compat.checkpoint_function(wrapper)
    return (
        fn is torch.utils.checkpoint.checkpoint
        and keywords == {"use_reentrant": False, "preserve_rng_state": False}
        and wrapper.checkpoint_impl == _compat.CheckpointImpl.NO_REENTRANT
        and getattr(wrapper, _compat.WRAPPED_MODULE_ATTR) is wrapper._modules[_compat.WRAPPED_MODULE_ATTR]
        and wrapper.in_features == 2  # torch's __getattr__ forwards reads
        and issubclass(_compat.TorchOffloadWrapper, _compat.TorchActivationWrapper)
    )


def _dcp_walk_signature() -> bool:
    walk = _compat.dcp_fqn_walk()
    return walk is not None and tuple(inspect.signature(walk).parameters) == _compat.DCP_FQN_WALK_PARAMETERS


def _compiled_original() -> bool:
    model = nn.Linear(2, 2)
    return (
        _compat.compiled_original(torch.compile(model)) is model and _compat.compiled_original(model) is None
    )


def _accelerate() -> bool:
    pytest.importorskip("accelerate")
    from accelerate.utils import FullyShardedDataParallelPlugin

    assert _compat.accelerate_differences() == []
    plugin = FullyShardedDataParallelPlugin()
    _compat.set_plugin_checkpointing(plugin, True, False)
    return _compat.plugin_checkpointing(plugin) == (True, False) and _compat.plugin_fsdp_version(plugin) in (
        1,
        2,
    )


INTERNALS: list[tuple[str, str, Callable[[], bool]]] = [
    (
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper (ActivationWrapper, CheckpointWrapper, "
        "OffloadWrapper, CheckpointImpl, checkpoint_fn as a partial, _checkpoint_wrapped_module)",
        "names, wrappers, policies",
        _torch_wrapper_shape,
    ),
    (
        "torch._C._autograd._top_saved_tensors_default_hooks (checkpoint's hooks in scope)",
        "recompute",
        _hooks_in_checkpoint,
    ),
    (
        "torch.utils.checkpoint's _checkpoint_internal/_user_hooks marks (read from torch 2.14)",
        "recompute",
        _transparent_hooks,
    ),
    (
        "torch.distributed._composable_state._State as FSDP2's state base",
        "recompute",
        _fsdp2_state_is_composable,
    ),
    (
        "torch.nn.modules.batchnorm._NormBase",
        "recompute",
        lambda: isinstance(nn.BatchNorm1d(2), _compat.NormBase),
    ),
    (
        "torch.utils._python_dispatch (TorchDispatchMode, is_traceable_wrapper_subclass)",
        "recompute, memory, offload, selective",
        lambda: (
            issubclass(_compat.TorchDispatchMode, object)
            and not _compat.is_traceable_wrapper_subclass(torch.ones(1))
        ),
    ),
    (
        "torch.utils._pytree.tree_leaves",
        "recompute, memory, selective",
        lambda: _compat.tree_leaves(([1], {"a": 2})) == [1, 2],
    ),
    (
        "torch._ops.OpOverload, OpOverloadPacket",
        "strategies, selective",
        lambda: (
            isinstance(torch.ops.aten.mm.default, _compat.OpOverload)
            and isinstance(torch.ops.aten.mm, _compat.OpOverloadPacket)
        ),
    ),
    ("UntypedStorage._new_with_weak_ptr, StorageWeakRef.cdata", "memory, selective", _storage_round_trip),
    (
        "OpOverload._schema's alias_info.is_write (operators writing in place)",
        "selective, profiler",
        lambda: _compat.written_tensors(torch.ops.aten.mul_.Tensor, (t := torch.ones(1), t), {}) == [t],
    ),
    (
        "torch.utils.checkpoint's SAC cache (_CachingTorchDispatchMode.storage, _RECOMPUTE, ctx.op_output)",
        "selective",
        _uncache_selective_output,
    ),
    (
        "torch.distributed.fsdp.wrap._Policy._run_policy, CustomPolicy._lambda_fn",
        "policies",
        _policy_hooks,
    ),
    (
        "DistributedDataParallel._get_active_ddp_module",
        "wrappers",
        lambda: _compat.active_ddp_module() is None,
    ),
    (
        "torch.distributed.checkpoint.state_dict._get_fqns's parameters",
        "dcp",
        _dcp_walk_signature,
    ),
    ("torch.compile's _orig_mod", "accelerate", _compiled_original),
    (
        "Accelerate's plugin fields, set_auto_wrap_policy, fsdp2_apply_ac, Accelerator.prepare(_model)",
        "accelerate",
        _accelerate,
    ),
]


@pytest.mark.parametrize("internal, users, check", INTERNALS, ids=[row[0].split(" ")[0] for row in INTERNALS])
def test_internal_is_there_as_fsdp_ac_uses_it(internal: str, users: str, check: Callable[[], bool]) -> None:
    try:
        ok = check()
    except (AttributeError, ImportError, TypeError, KeyError) as error:
        pytest.fail(
            f"{internal}, used by fsdp_ac.{users}, is gone or changed on torch {torch.__version__}: {error!r}"
        )
    assert ok, f"{internal}, used by fsdp_ac.{users}, behaves differently on torch {torch.__version__}"


def test_fsdp1_unit_keeps_use_orig_params_and_flat_parameter_infos(single_rank_group: None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    inner = nn.Linear(2, 2)
    cpu = torch.device("cpu")
    flat = FSDP(nn.Sequential(inner), use_orig_params=False, device_id=cpu)
    kept = FSDP(nn.Sequential(nn.Linear(2, 2)), use_orig_params=True, device_id=cpu)
    where = "FSDP._use_orig_params / FlatParameter._param_infos, used by fsdp_ac.apply and fsdp_ac.policies"
    assert (_compat.uses_flat_parameters(flat), _compat.uses_flat_parameters(kept)) == (True, False), where
    flat_param = next(p for p in flat.parameters())
    assert _compat.flat_parameter_modules(flat_param) == [inner, inner], where  # weight and bias
    assert _compat.flat_parameter_modules(nn.Parameter(torch.ones(1))) is None, where


def test_a_missing_internal_fails_naming_it_and_its_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.distributed.checkpoint.state_dict, "_get_fqns")
    internal, users, check = next(row for row in INTERNALS if row[2] is _dcp_walk_signature)
    with pytest.raises(AssertionError, match=r"_get_fqns's parameters, used by fsdp_ac\.dcp"):
        test_internal_is_there_as_fsdp_ac_uses_it(internal, users, check)
