"""Which modules a policy selects for activation checkpointing.

The selection rules follow FSDP's auto-wrap exactly, so one policy object passed both to FSDP and to
:func:`fsdp_ac.apply_activation_checkpointing` gives FSDP units and AC regions that coincide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    ActivationWrapper as TorchActivationWrapper,
)

from fsdp_ac.names import WRAPPED_MODULE_ATTR

__all__ = ["post_order", "select_modules"]


def select_modules(
    model: nn.Module, check_fn: Callable[[nn.Module], bool], auto_wrap_policy: Any
) -> list[nn.Module]:
    """Returns the modules of ``model`` that a policy selects, children before parents.

    Never the root, a wrapper, or a module a wrapper already holds: applying twice does not nest.

    Args:
        model: The model to search.
        check_fn: Called on each candidate when ``auto_wrap_policy`` is ``None``.
        auto_wrap_policy: An FSDP policy object, or a callable ``(module, recurse,
            nonwrapped_numel) -> bool`` evaluated as FSDP's recursive auto-wrap does.

    Raises:
        TypeError: ``auto_wrap_policy`` is neither a policy object nor a callable.
    """
    from torch.distributed.fsdp.wrap import _Policy

    order = post_order(model)
    already_wrapped = {
        getattr(m, WRAPPED_MODULE_ATTR) for m in order if isinstance(m, TorchActivationWrapper)
    }

    def eligible(module: nn.Module) -> bool:
        return (
            module is not model
            and module not in already_wrapped
            and not isinstance(module, TorchActivationWrapper)
        )

    if auto_wrap_policy is None:
        return [m for m in order if eligible(m) and check_fn(m)]
    if isinstance(auto_wrap_policy, _Policy):
        chosen = auto_wrap_policy._run_policy(model, ignored_modules=set(), root_kwargs={})
        return [m for m in order if m in chosen and eligible(m)]
    if not callable(auto_wrap_policy):
        raise TypeError(
            f"auto_wrap_policy must be an FSDP policy object or a callable "
            f"(module, recurse, nonwrapped_numel) -> bool, got {type(auto_wrap_policy).__name__}."
        )
    chosen_list: list[nn.Module] = []

    def visit(module: nn.Module) -> int:
        """Mirrors FSDP's recursive auto-wrap; returns the parameter count it wrapped."""
        numel = sum(p.numel() for p in module.parameters())
        if not auto_wrap_policy(module=module, recurse=True, nonwrapped_numel=numel):
            return 0
        wrapped = sum(visit(child) for child in module.children())
        if module is not model and auto_wrap_policy(
            module=module, recurse=False, nonwrapped_numel=numel - wrapped
        ):
            chosen_list.append(module)
            return numel
        return wrapped

    visit(model)
    return [m for m in chosen_list if eligible(m)]


def post_order(module: nn.Module) -> list[nn.Module]:
    """Returns every module reachable from ``module`` once, children before parents."""
    seen: set[nn.Module] = set()
    order: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        seen.add(m)
        for child in m.children():
            if child not in seen:
                visit(child)
        order.append(m)

    visit(module)
    return order
