"""torch DCP's parameter names through an activation wrapper that holds an FSDP1 unit.

Applying activation checkpointing before FSDP1's auto-wrap (torch's standard FSDP1 recipe) gives
``CheckpointWrapper(FSDP(block))``. It trains, but torch's distributed checkpoint (DCP) cannot restore
its optimizer state: ``set_optimizer_state_dict`` raises "Missing optimizer state for parameter
'layers.0._fsdp_wrapped_module.ln_1.weight'". DCP maps each parameter to its fully qualified name
(FQN) with ``torch.distributed.checkpoint.state_dict._get_fqns``, a walk down the model along the
parameter's attribute path. The walk first deletes every ``_checkpoint_wrapped_module`` segment, so
from the wrapper it goes on through the wrapper's attribute forwarding and never stands on the FSDP
unit: its ``isinstance(module, FSDP)`` step never runs there, the unit's ``_fsdp_wrapped_module``
stays in the FQN, and a flat parameter (``use_orig_params=False``) is not expanded into the names of
the parameters it holds. FSDP saves the optimizer state under clean names, so none is found on load.

No attribute of the wrapper can fix that: the walk puts every segment it reads at a module other
than DDP, FSDP1 or a compiled module into the FQN, and the one segment between the wrapper and the
unit is the one it deletes. So this module adapts the walk, the one place where fsdp_ac changes a
torch internal: a name whose path reaches one of fsdp_ac's activation wrappers around an FSDP1 unit is
resolved in two parts, the path to the wrapper from the model and the rest from the unit, each by
torch's own walk; every other name, those through torch's own wrappers included, goes to torch's walk
unchanged. fsdp_ac installs the adaptation (:func:`adapt_dcp_names`) when one of its wrappers first
takes an FSDP1 unit, never at import, and keeps it for the rest of the process.

Checked on torch 2.13.0 and 2.14.1 (:data:`CHECKED_TORCH`). On a torch whose ``_get_fqns`` is missing
or has another signature the adaptation is not installed and the nesting is refused instead, naming
the nestings that need none.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from fsdp_ac._compat import CHECKED_TORCH, DCP_FQN_WALK_PARAMETERS, dcp_fqn_walk, replace_dcp_fqn_walk
from fsdp_ac.names import WRAPPED_MODULE_ATTR, unwrap

__all__ = ["CHECKED_TORCH", "adapt_dcp_names"]

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
            # torch's walk returns a dotless name as it is (DDP's "module" would stay), so the path
            # goes with the segment after it, which the walk appends unchanged at the wrapper: the
            # FQN up to the wrapper is what precedes that segment.
            (through,) = self.__wrapped__(model, ".".join([*path, rest[0]]), *options)
            prefix = through.rpartition(".")[0]
        inner = self(unit, ".".join(rest), *options)
        return {f"{prefix}.{fqn}" if prefix else fqn for fqn in inner}


def adapt_dcp_names(region_name: str, wrapper_type: type[nn.Module]) -> None:
    """Makes DCP name parameters under an fsdp_ac wrapper that holds an FSDP1 unit; idempotent.

    Replaces ``torch.distributed.checkpoint.state_dict._get_fqns`` by a walk that resolves such names
    in two parts (see the module docstring) and hands every other name to the function it replaces.

    Args:
        region_name: The wrapper's region, named in the error.
        wrapper_type: fsdp_ac's activation wrapper class (torch's own wrappers keep torch's walk).

    Raises:
        ValueError: This torch's ``_get_fqns`` is missing or differs from the checked torch's, so the
            adaptation cannot be checked to hold; the message names the nestings that need none.
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
    """Where the path of ``name`` reaches an fsdp_ac wrapper around an FSDP1 unit.

    Returns:
        The segments up to the wrapper, the unit, and the segments after it without the wrapper's
        own; None when the path reaches no such wrapper (or a segment is no module's attribute).
    """
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
