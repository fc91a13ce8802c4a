"""torch DCP's parameter names through an activation wrapper that holds an FSDP1 unit.

``CheckpointWrapper(FSDP(block))`` (AC before FSDP1's auto-wrap) trains, but DCP's name walk cannot
restore its optimizer state; :func:`adapt_dcp_names` adapts the walk for such names only, when a
wrapper first takes an FSDP1 unit. See docs/differences.md, "DCP's name walk".
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from fsdp_ac._compat import (
    CHECKED_TORCH,
    DCP_FQN_WALK_PARAMETERS,
    WRAPPED_MODULE_ATTR,
    dcp_fqn_walk,
    replace_dcp_fqn_walk,
)
from fsdp_ac.names import unwrap

_Walk = Callable[..., set[str]]


class _WalkThroughWrappedUnits:
    """torch's ``_get_fqns``, but seeing FSDP1 units inside fsdp_ac's activation wrappers."""

    def __init__(self, torch_walk: _Walk, wrapper_type: type[nn.Module]) -> None:
        self.__wrapped__ = torch_walk
        self.wrapper_type = wrapper_type

    def __call__(
        self,
        model: nn.Module,
        name: str,
        dsd_fqn_modifiers: str = "_fqn_modifiers",
        skip_ddp_prefix: bool = True,
        skip_compiler_prefix: bool = True,
    ) -> set[str]:
        options = (dsd_fqn_modifiers, skip_ddp_prefix, skip_compiler_prefix)
        split = _split_at_wrapped_unit(model, name, self.wrapper_type)
        if split is None:
            return self.__wrapped__(model, name, *options)
        path, unit, rest = split
        prefix = ""
        if path:
            # A dotless name comes back as it is (DDP's "module" would stay), so the path goes with
            # the next segment, which the walk appends unchanged at the wrapper.
            (through,) = self.__wrapped__(model, ".".join([*path, rest[0]]), *options)
            prefix = through.rpartition(".")[0]
        inner = self(unit, ".".join(rest), *options)
        return {f"{prefix}.{fqn}" if prefix else fqn for fqn in inner}


def adapt_dcp_names(region_name: str, wrapper_type: type[nn.Module]) -> None:
    """Makes DCP name parameters under an fsdp_ac wrapper that holds an FSDP1 unit; idempotent.

    Replaces ``torch.distributed.checkpoint.state_dict._get_fqns`` by a walk that resolves such names
    in two parts (to the wrapper, then from the unit) and hands every other name to torch's.

    Args:
        region_name: The wrapper's region, named in the error.
        wrapper_type: fsdp_ac's activation wrapper class (torch's own wrappers keep torch's walk).

    Raises:
        ValueError: This torch's ``_get_fqns`` is missing or differs from the checked torch's.
    """
    current = dcp_fqn_walk()
    if isinstance(current, _WalkThroughWrappedUnits):
        return
    checked = " and ".join(CHECKED_TORCH)
    if current is None or tuple(inspect.signature(current).parameters) != DCP_FQN_WALK_PARAMETERS:
        raise ValueError(
            f"FSDP1's unit is being placed inside the activation wrapper around '{region_name}' "
            "(CheckpointWrapper(FSDP(block))). torch's DCP cannot restore that nesting's optimizer state "
            f"by itself, and fsdp_ac's adaptation of its name walk was checked on torch {checked}, "
            f"while torch {torch.__version__} has another torch.distributed.checkpoint.state_dict."
            "_get_fqns. Pass auto_wrap_policy=fsdp_ac.ModulePolicy(<your block classes>) to FSDP, which "
            "makes FSDP(CheckpointWrapper(block)), or apply activation checkpointing after FSDP."
        )
    replace_dcp_fqn_walk(_WalkThroughWrappedUnits(current, wrapper_type))


def _split_at_wrapped_unit(
    model: nn.Module, name: str, wrapper_type: type[nn.Module]
) -> tuple[list[str], nn.Module, list[str]] | None:
    """The segments of ``name`` up to an fsdp_ac wrapper around an FSDP1 unit, the unit, the rest; or None."""
    segments = name.split(".")
    module: object = model
    for index, segment in enumerate(segments):
        if isinstance(module, wrapper_type) and isinstance(unwrap(module), FullyShardedDataParallel):
            rest = list(itertools.dropwhile(lambda part: part == WRAPPED_MODULE_ATTR, segments[index:]))
            return (segments[:index], unwrap(module), rest) if rest else None
        if index == len(segments) - 1 or not isinstance(module, nn.Module):
            return None
        module = getattr(module, segment, None)
    return None
