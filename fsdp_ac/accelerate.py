"""Hugging Face Accelerate integration: Accelerate's activation checkpointing settings, done by fsdp_ac.

One line in the training script replaces ``accelerator.prepare``::

    model, optimizer, loader = fsdp_ac.accelerate.prepare(accelerator, model, optimizer, loader)

It reads Accelerate's settings (``fsdp_activation_checkpointing``,
``fsdp_activation_checkpointing_offload``, the auto-wrap policy, ``fsdp_transformer_layer_cls_to_wrap``
or the model's ``_no_split_modules``, ``fsdp_version``) and fsdp_ac's own (``FSDP_AC_*`` variables or
``fsdp_ac_*`` keys of the config file, parsed here, see ``docs/environment.md``), turns Accelerate's own
checkpointing off for the call, lets Accelerate shard or replicate the model exactly as configured, and
then checkpoints the chosen blocks with fsdp_ac's wrappers, inside the FSDP units Accelerate made.

Why after ``accelerator.prepare`` and not before: Accelerate's FSDP2 path shards every module its class
policy matches, looking through checkpoint wrappers, so a block checkpointed before sharding becomes
two nested FSDP units (the wrapper and the block). Checkpointing after sharding gives exactly one FSDP
unit and one activation-checkpoint region per block, for FSDP1, FSDP2 and DDP alike.

What this fixes in Accelerate (``docs/accelerate.md`` has the details, the tests and the releases that
show each; all of them 1.15.0 and 1.16.0 unless said):

- FSDP2 checkpoints with ``preserve_rng_state=False``: with dropout, gradients differ from those
  without checkpointing. fsdp_ac preserves the RNG state.
- ``NO_WRAP`` with activation checkpointing crashes (FSDP2) or checkpoints every module, nested
  (FSDP1); a transformer policy whose classes match nothing checkpoints nothing. fsdp_ac raises a
  ``ValueError`` that names the setting to change.
- FSDP2 makes two nested FSDP units per checkpointed block (up to 1.15; 1.16 makes one); fsdp_ac
  makes one.
- Without GPUs Accelerate runs DDP (or, without ``cpu=True``, one unrelated process per rank) and drops
  activation checkpointing; fsdp_ac still checkpoints, and refuses processes that would not train
  together.
- Parameter and state-dict names carry ``_checkpoint_wrapped_module``; fsdp_ac's do not.

``accelerate`` is imported only when these functions run, so ``fsdp_ac`` imports without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fsdp_ac._compat import (
    CHECKED_ACCELERATE,
    ROUTED_ACCELERATOR_METHODS,
    accelerate_differences,
    accelerator_fsdp_plugin,
    compiled_original,
    hf_no_split_modules,
    plugin_checkpointing,
    plugin_fsdp_version,
    plugin_wrap_policy,
    set_plugin_checkpointing,
)
from fsdp_ac.offload import DEFAULT_MIN_OFFLOAD_BYTES
from fsdp_ac.plan import ActivationPlan
from fsdp_ac.planner import BudgetError
from fsdp_ac.planner import plan as plan_for_budget
from fsdp_ac.policies import ModulePolicy
from fsdp_ac.profiler import Workload, profile
from fsdp_ac.strategies import STRATEGIES, Full, NoCheckpoint, Offload, Strategy, parse_strategy

__all__ = [
    "ActivationCheckpointingSettings",
    "accelerate_fsdp_requested",
    "activation_plan",
    "environment_settings",
    "prepare",
    "read_settings",
]

logger = logging.getLogger(__name__)

_FILE_KEY_PREFIX = "fsdp_ac_"
_FILE_SECTION = "fsdp_config"


@dataclasses.dataclass(frozen=True)
class ActivationCheckpointingSettings:
    """What :func:`prepare` does, merged from Accelerate's settings and fsdp_ac's.

    Each fsdp_ac setting comes from ``FSDP_AC_<NAME>`` if set, else from the key ``fsdp_ac_<name>`` in
    the ``fsdp_config`` section of the file named by ``FSDP_AC_CONFIG_FILE``, else from Accelerate.
    """

    enabled: bool
    """Whether blocks are checkpointed: Accelerate's ``activation_checkpointing``, or any of fsdp_ac's
    ``policy``, ``strategy`` or ``plan`` given; ``policy: none`` turns it off."""
    policy: str = "all"
    """Which blocks: ``all``, ``every:N``, ``first:K``, ``last:K`` or ``budget:F``: the memory planner
    (:mod:`fsdp_ac.planner`) measures the model on a sample batch and chooses per block ``none``,
    ``full`` or a selective set of operators, so that the activations fit ``F`` of the bytes they take
    without checkpointing, at the least recompute time."""
    strategy: Strategy = dataclasses.field(default_factory=Full)
    """What each chosen block gets (:mod:`fsdp_ac.strategies`), with the offload options below; under
    ``budget:F`` the planner chooses instead."""
    plan: Path | None = None
    """An :class:`~fsdp_ac.ActivationPlan` JSON file applied instead of ``policy`` and ``strategy``."""
    blocks: tuple[str, ...] | None = None
    """Block class names; None to take Accelerate's (its transformer classes, ``_no_split_modules``)."""
    offload: bool = False
    """Offload the inputs of checkpointed blocks to CPU memory (``full`` becomes ``full+offload``)."""
    offload_min_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES
    """Saved tensors smaller than this stay on their device."""
    pin_memory: bool = True
    """Offload into page-locked memory (where CUDA is available)."""
    sample_shape: tuple[int, ...] | None = None
    """For ``budget:F``: the shape of a batch of random inputs to plan on (token ids below the
    vocabulary size when the model has an embedding), instead of the first batch of the DataLoader
    given to :func:`prepare`."""
    fsdp_version: int | None = None
    """Accelerate's ``fsdp_version`` when it was configured for FSDP, else None."""
    fsdp_active: bool = False
    """Whether Accelerate runs FSDP; False when it dropped an FSDP config (no GPU) or has none."""


def read_settings(accelerator: Any) -> ActivationCheckpointingSettings:
    """Returns the activation checkpointing settings that :func:`prepare` applies for ``accelerator``.

    Args:
        accelerator: The ``accelerate.Accelerator`` of the run.

    Raises:
        ValueError: A setting has an invalid value, the config file holds an unknown ``fsdp_ac_*`` key,
            ``plan`` is combined with ``policy``, ``strategy`` or ``offload``, ``offload`` is asked
            for without activation checkpointing or with a strategy it does not combine with,
            ``budget:F`` is combined with ``strategy`` or ``offload``, or ``sample_shape`` is given
            without ``budget:F``. Each message names the setting.

    Example:
        >>> settings = fsdp_ac.accelerate.read_settings(accelerator)
        >>> settings.enabled, settings.policy, str(settings.strategy)
        (True, 'all', 'full')
    """
    plugin, active = _fsdp_plugin(accelerator)
    return _merge_settings(plugin, active, _fsdp_ac_settings())


def activation_plan(accelerator: Any, model: nn.Module, sample: Any = None) -> ActivationPlan:
    """Returns the plan :func:`prepare` applies to ``model``: which blocks get which strategy.

    Call it before ``prepare`` to print or save the plan (``plan.table(model)``). Empty when
    activation checkpointing is off. Under ``budget:F`` it profiles ``model`` and runs the planner,
    as :func:`prepare` does (in a distributed run, on every rank together).

    Args:
        accelerator: The ``accelerate.Accelerator`` of the run.
        model: The model as it will be passed to ``prepare`` (not yet prepared).
        sample: For ``budget:F`` without ``sample_shape``: the training ``DataLoader`` (its first
            batch is planned on, see :func:`prepare`) or one batch as it yields them.

    Raises:
        ValueError: See :func:`read_settings`; also when the blocks cannot be determined: FSDP with
            ``NO_WRAP`` (or ``SIZE_BASED_WRAP`` with ``min_num_params`` 0) and no ``blocks`` setting, a
            transformer policy without classes, or block classes that match no module of ``model``;
            and under ``budget:F`` when there is no sample, or the model cannot be run on it.
        BudgetError: ``budget:F`` is below what any plan needs; the message gives the least ``F``.
    """
    plugin, active = _fsdp_plugin(accelerator)
    return _plan(model, _merge_settings(plugin, active, _fsdp_ac_settings()), plugin, sample)


def prepare(accelerator: Any, *args: Any, device_placement: list[bool] | None = None) -> Any:
    """Drop-in for ``accelerator.prepare(*args)`` that does the activation checkpointing with fsdp_ac.

    Accelerate's own activation checkpointing is switched off for the call (and switched back on
    after it), so a model is never checkpointed twice. Each model is first prepared by Accelerate
    exactly as configured (FSDP1, FSDP2, DDP, one process); then the blocks chosen by
    :func:`activation_plan` are wrapped in place, inside the FSDP units Accelerate made.

    Under ``budget:F``, before Accelerate prepares, the main process (rank 0) profiles four training
    steps of each model (a warm-up and three measured, where the model is at the call: usually the CPU)
    on a sample batch: random inputs of the ``sample_shape`` setting, else the first batch of the first
    ``DataLoader`` among ``args``. That batch is read from a fresh iterator, with the random number
    generators it draws from (torch's global one, the loader's and its sampler's, Python's) restored
    afterwards, so the training data order is unchanged; the cost is loading one batch (and, with
    ``num_workers`` > 0, starting the workers once more). The profile's own steps leave the model's
    parameters, buffers and gradients and the random state as they were. Rank 0 plans and sends the
    plan to every rank, which all apply the same one (each rank's timings would differ).

    Args:
        accelerator: The ``accelerate.Accelerator`` of the run.
        *args: What ``accelerator.prepare`` takes: models, optimizers, data loaders, schedulers.
        device_placement: Passed to ``accelerator.prepare``.

    Returns:
        What ``accelerator.prepare`` returns: the prepared objects in order, or the only one.

    Raises:
        ValueError: See :func:`activation_plan`; also when ``accelerate launch`` started several
            processes that Accelerate runs as unrelated single-process jobs (no GPU and no
            ``cpu=True``), which would train one model per process without a word, and when
            checkpointing is asked for under DeepSpeed, Megatron-LM or XLA.
        BudgetError: ``budget:F`` is below what any plan needs; the message gives the least ``F``.

    Example:
        >>> import fsdp_ac.accelerate
        >>> accelerator = Accelerator()
        >>> model, optimizer = fsdp_ac.accelerate.prepare(accelerator, model, optimizer)
    """
    plugin, active = _fsdp_plugin(accelerator)
    settings = _merge_settings(plugin, active, _fsdp_ac_settings())
    _refuse_unrelated_processes(accelerator)
    if settings.enabled:
        _refuse_unsupported(accelerator)
    if plugin is not None and not active and settings.enabled:
        warnings.warn(
            f"Accelerate was configured for FSDP but runs {accelerator.distributed_type} (Accelerate "
            "uses FSDP only on GPUs and other accelerators) and would drop activation checkpointing; "
            "fsdp_ac checkpoints the blocks anyway.",
            UserWarning,
            stacklevel=2,
        )
    loader = next((arg for arg in args if isinstance(arg, torch.utils.data.DataLoader)), None)
    plans = {
        i: _plan(arg, settings, plugin, loader) for i, arg in enumerate(args) if isinstance(arg, nn.Module)
    }
    with _accelerate_checkpointing_off(plugin if active else None):
        prepared = accelerator.prepare(*args, device_placement=device_placement)
    # One object for one argument; a tuple, or a list under FSDP2, for several.
    results = (prepared,) if len(args) == 1 else tuple(prepared)
    for index, plan in plans.items():
        if len(plan):
            _apply(plan, results[index], accelerator.is_main_process)
    return prepared


# --- settings ----------------------------------------------------------------------------------------


def _fsdp_plugin(accelerator: Any) -> tuple[Any, bool]:
    """Accelerate's FSDP plugin, and whether Accelerate runs FSDP with it.

    When ``accelerate launch`` had an FSDP config but Accelerate dropped it (no GPU), the plugin is
    rebuilt from the ``FSDP_*`` variables the launcher set, which is how Accelerate builds it.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator_fsdp_plugin(accelerator), True
    if accelerate_fsdp_requested():
        return FullyShardedDataParallelPlugin(), False
    return None, False


def accelerate_fsdp_requested() -> bool:
    """True when ``accelerate launch`` was given an FSDP config (it sets ``ACCELERATE_USE_FSDP``).

    Raises:
        ValueError: The variable is set to something other than a boolean.
    """
    raw = os.environ.get("ACCELERATE_USE_FSDP", "").strip()
    return bool(raw) and _parse_bool(raw, "ACCELERATE_USE_FSDP")


def environment_settings() -> dict[str, object]:
    """Returns fsdp_ac's settings given as ``FSDP_AC_<NAME>`` variables, parsed, by name.

    Raises:
        ValueError: A variable has an invalid value; the message names it and the values it takes.

    Example:
        >>> os.environ["FSDP_AC_POLICY"] = "every:2"
        >>> environment_settings()
        {'policy': 'every:2'}
    """
    return {name: found[0] for name, found in _environment_settings().items()}


def _environment_settings() -> dict[str, tuple[object, str]]:
    found: dict[str, tuple[object, str]] = {}
    for name, parse in _SETTING_PARSERS.items():
        variable = f"FSDP_AC_{name.upper()}"
        raw = os.environ.get(variable, "").strip()
        if raw:
            found[name] = (parse(raw, variable), variable)
    return found


def _fsdp_ac_settings() -> dict[str, tuple[object, str]]:
    """fsdp_ac's own settings: ``{name: (value, where it came from)}``, the environment over the file."""
    found: dict[str, tuple[object, str]] = {}
    raw = os.environ.get("FSDP_AC_CONFIG_FILE", "").strip()
    if raw:
        found.update(_read_config_file(_parse_existing_file(raw, "FSDP_AC_CONFIG_FILE")))
    found.update(_environment_settings())
    return found


def _read_config_file(path: Path) -> dict[str, tuple[object, str]]:
    """The ``fsdp_ac_*`` keys of the ``fsdp_config`` section of an Accelerate config file, parsed."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        import json

        document = json.loads(text)
    else:
        import yaml  # a dependency of accelerate

        document = yaml.safe_load(text)
    section = document.get(_FILE_SECTION) if isinstance(document, dict) else None
    stray = sorted(k for k in (document or {}) if isinstance(k, str) and k.startswith(_FILE_KEY_PREFIX))
    if stray:
        raise ValueError(
            f"{path} has {', '.join(stray)} at the top level, where accelerate launch rejects unknown "
            f"keys; move them into the {_FILE_SECTION} section."
        )
    found: dict[str, tuple[object, str]] = {}
    for key, raw in (section or {}).items():
        if not (isinstance(key, str) and key.startswith(_FILE_KEY_PREFIX)):
            continue
        name = key[len(_FILE_KEY_PREFIX) :]
        parse = _SETTING_PARSERS.get(name)
        if parse is None:
            known = ", ".join(_FILE_KEY_PREFIX + n for n in _SETTING_PARSERS)
            raise ValueError(f"{path}: unknown key {_FILE_SECTION}.{key}; the fsdp_ac keys are {known}.")
        source = f"{_FILE_SECTION}.{key} in {path}"
        if name == "plan":
            raw = path.parent / Path(str(raw)).expanduser()  # relative to the config file
        found[name] = (parse(raw, source), source)
    return found


def _merge_settings(
    plugin: Any, active: bool, own: Mapping[str, tuple[object, str]]
) -> ActivationCheckpointingSettings:
    """Accelerate's flags, overridden by fsdp_ac's settings; checks that they fit together."""
    value = {name: found[0] for name, found in own.items()}
    source = {name: found[1] for name, found in own.items()}
    accelerate_ac, accelerate_offload = plugin_checkpointing(plugin) if plugin is not None else (False, False)
    if "plan" in value and ("policy" in value or "strategy" in value or value.get("offload")):
        other = source.get("policy") or source.get("strategy") or source["offload"]
        raise ValueError(
            f"{source['plan']} gives an activation plan, which already says which block gets what; "
            f"remove {other}, or the plan."
        )
    policy = str(value.get("policy", "all"))
    enabled = policy != "none" and (accelerate_ac or any(k in value for k in ("policy", "strategy", "plan")))
    # Accelerate's offload flag goes with its checkpointing flag, which fsdp_ac's policy none overrides.
    offload = bool(value["offload"]) if "offload" in value else accelerate_offload and enabled
    strategy = cast(Strategy, value.get("strategy", Full()))
    if policy.startswith("budget:"):
        chooser = source.get("strategy") or (
            source.get("offload", "fsdp_activation_checkpointing_offload") if offload else None
        )
        if chooser is not None:
            raise ValueError(
                f"{source.get('policy', 'policy')}={policy} lets the memory planner choose each block's "
                f"strategy (none, full or selective), so {chooser} has nothing to set; remove it, or use "
                "a policy that picks blocks (all, every:N, first:K, last:K)."
            )
    elif "sample_shape" in value:
        raise ValueError(
            f"{source['sample_shape']} gives the batch shape the memory planner of policy budget:F "
            f"plans on, but the policy is {policy}; remove it, or set the policy to budget:F."
        )
    if offload and not enabled:
        raise ValueError(
            f"{source['offload']} asks to offload the inputs of checkpointed blocks, but activation "
            "checkpointing is off; set fsdp_activation_checkpointing: true (or FSDP_AC_POLICY=all), or "
            "drop the offload."
        )
    if offload and "plan" not in value:
        if isinstance(strategy, Full):
            strategy = Offload(strategy)
        elif not isinstance(strategy, Offload):
            raise ValueError(
                f"Offloading checkpointed inputs combines with full checkpointing only, not with "
                f"{str(strategy)!r} ({source.get('strategy', 'strategy')}); use strategy full+offload, or "
                "turn the offload off."
            )
    offload_min_bytes = cast(int, value.get("offload_min_bytes", DEFAULT_MIN_OFFLOAD_BYTES))
    pin_memory = cast(bool, value.get("pin_memory", True))
    return ActivationCheckpointingSettings(
        enabled=enabled,
        policy=policy,
        strategy=_with_offload_options(strategy, pin_memory, offload_min_bytes),
        plan=cast("Path | None", value.get("plan")),
        blocks=cast("tuple[str, ...] | None", value.get("blocks")),
        offload=offload,
        offload_min_bytes=offload_min_bytes,
        pin_memory=pin_memory,
        sample_shape=cast("tuple[int, ...] | None", value.get("sample_shape")),
        fsdp_version=plugin_fsdp_version(plugin) if plugin is not None else None,
        fsdp_active=active,
    )


def _with_offload_options(strategy: Strategy, pin_memory: bool, min_offload_bytes: int) -> Strategy:
    if not isinstance(strategy, Offload):
        return strategy
    return dataclasses.replace(strategy, pin_memory=pin_memory, min_offload_bytes=min_offload_bytes)


# --- parsing settings ---------------------------------------------------------------------------------
# Each parser takes a value from the environment (a string) or from a config file (a string, bool,
# number or list) and the place it came from, which every error names.

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_POLICY_KINDS = ("every", "first", "last", "budget")


def _parse_bool(raw: object, source: str) -> bool:
    """Parses ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``, a YAML bool)."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{source} must be true or false, got {raw!r}.")


def _parse_byte_count(raw: object, source: str) -> int:
    """Parses a non-negative integer number of bytes."""
    text = str(raw).strip()
    if isinstance(raw, bool) or not text.isdigit():
        raise ValueError(f"{source} must be a non-negative integer number of bytes, got {raw!r}.")
    return int(text)


def _parse_class_names(raw: object, source: str) -> tuple[str, ...]:
    """Parses block class names: a comma-separated string or a list of strings."""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    names = tuple(str(item).strip() for item in items if str(item).strip())
    if not names:
        raise ValueError(f"{source} must name at least one block class, e.g. LlamaDecoderLayer; got {raw!r}.")
    return names


def _parse_ac_policy(raw: object, source: str) -> str:
    """Parses which blocks: all, none, every:N, first:K, last:K or budget:F; returns it normalised."""
    text = str(raw).strip().lower().replace(" ", "")
    if text in ("all", "none"):
        return text
    kind, sep, arg = text.partition(":")
    if sep and kind in _POLICY_KINDS:
        if kind == "budget":
            try:
                fraction = float(arg)
            except ValueError:
                fraction = math.nan
            if 0 < fraction <= 1:
                return f"budget:{fraction:g}"
        elif arg.isdigit() and int(arg) >= 1:
            return f"{kind}:{int(arg)}"
    raise ValueError(
        f"{source} must be one of all, none, every:N, first:K, last:K (positive integers) or budget:F "
        f"(0 < F <= 1), got {raw!r}."
    )


def _parse_ac_strategy(raw: object, source: str) -> Strategy:
    """Parses what each chosen block gets: any strategy but ``none`` (see ``parse_strategy``)."""
    strategy = parse_strategy(str(raw), source)
    if isinstance(strategy, NoCheckpoint):
        allowed = [spelling for spelling in STRATEGIES if spelling != "none"]
        raise ValueError(f"{source} must be one of {', '.join(allowed)}; got {raw!r}.")
    return strategy


def _parse_shape(raw: object, source: str) -> tuple[int, ...]:
    """Parses a tensor shape: positive integers separated by commas or ``x``, or a list of them."""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).lower().replace("x", ",").split(",")
    texts = [str(item).strip() for item in items]
    if not texts or not all(text.isdigit() and int(text) >= 1 for text in texts) or isinstance(raw, bool):
        raise ValueError(
            f"{source} must be a shape of positive integers, e.g. 4,1024 (batch, sequence), got {raw!r}."
        )
    return tuple(int(text) for text in texts)


def _parse_existing_file(raw: object, source: str) -> Path:
    """Parses the path of a file that must exist."""
    path = Path(str(raw)).expanduser()
    if not path.is_file():
        raise ValueError(f"{source} names {str(raw)!r}, which is not a file.")
    return path


_SETTING_PARSERS: dict[str, Callable[[object, str], object]] = {
    "policy": _parse_ac_policy,
    "strategy": _parse_ac_strategy,
    "plan": _parse_existing_file,
    "blocks": _parse_class_names,
    "offload": _parse_bool,
    "offload_min_bytes": _parse_byte_count,
    "pin_memory": _parse_bool,
    "sample_shape": _parse_shape,
}
"""The settings of the Accelerate integration: ``FSDP_AC_<NAME>`` in the environment,
``fsdp_ac_<name>`` in a config file, each read by its parser."""


# --- which blocks --------------------------------------------------------------------------------


def _plan(
    model: nn.Module, settings: ActivationCheckpointingSettings, plugin: Any, sample: Any = None
) -> ActivationPlan:
    if not settings.enabled:
        return ActivationPlan({})
    if settings.plan is not None:
        plan = ActivationPlan.load(settings.plan)
        try:
            plan.check(model)
        except ValueError as error:
            raise ValueError(f"{settings.plan}: {error}") from None
        return ActivationPlan(
            {
                name: _with_offload_options(strategy, settings.pin_memory, settings.offload_min_bytes)
                for name, strategy in plan.strategies.items()
            }
        )
    blocks = _blocks(model, settings, plugin)
    kind, _, arg = settings.policy.partition(":")
    if kind == "every":
        blocks = blocks.every(int(arg))
    elif kind == "first":
        blocks = blocks.first(int(arg))
    elif kind == "last":
        blocks = blocks.last(int(arg))
    elif kind == "budget":
        return _budget_plan(model, blocks, float(arg), settings.sample_shape, sample)
    return ActivationPlan.from_policy(model, blocks, settings.strategy)


def _blocks(model: nn.Module, settings: ActivationCheckpointingSettings, plugin: Any) -> ModulePolicy:
    """The blocks to checkpoint, chosen as Accelerate chooses its FSDP units."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    model_name = type(model).__name__
    if settings.blocks is not None:
        return ModulePolicy(set(settings.blocks))
    if plugin is None:
        names = hf_no_split_modules(model)
        if names:
            return ModulePolicy(set(names))
        raise ValueError(
            f"Activation checkpointing is on, but nothing names the blocks of {model_name}: it has no "
            "_no_split_modules and Accelerate has no FSDP transformer policy. Set FSDP_AC_BLOCKS (or "
            "fsdp_ac_blocks in the config file) to the block class name, e.g. LlamaDecoderLayer."
        )
    # Accelerate's own resolution (transformer_cls_names_to_wrap, else _no_split_modules).
    policy = plugin_wrap_policy(plugin, model)
    if policy is None:
        raise ValueError(
            "fsdp_activation_checkpointing is on with fsdp_auto_wrap_policy NO_WRAP (or SIZE_BASED_WRAP "
            "with fsdp_min_num_params 0), so FSDP makes no unit per block and nothing says which modules "
            "to checkpoint (Accelerate's FSDP2 crashes here, its FSDP1 checkpoints every module, nested). "
            "Set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP (with fsdp_transformer_layer_cls_to_wrap "
            "unless the model has _no_split_modules), or name the blocks with FSDP_AC_BLOCKS."
        )
    func = policy.func if isinstance(policy, functools.partial) else policy
    if func is transformer_auto_wrap_policy:
        classes = (
            set(policy.keywords.get("transformer_layer_cls", ()))
            if isinstance(policy, functools.partial)
            else set()
        )
        if not classes:
            raise ValueError(
                f"fsdp_auto_wrap_policy is TRANSFORMER_BASED_WRAP, but no block class is known: "
                f"fsdp_transformer_layer_cls_to_wrap is unset and {model_name} has no _no_split_modules, "
                "so Accelerate would shard and checkpoint nothing. Set fsdp_transformer_layer_cls_to_wrap "
                "to the block class name, e.g. LlamaDecoderLayer."
            )
        return ModulePolicy(classes)
    return ModulePolicy(policy)


# --- budget:F: the memory planner on a sample batch -------------------------------------------------


def _budget_plan(
    model: nn.Module, blocks: ModulePolicy, fraction: float, shape: tuple[int, ...] | None, sample: Any
) -> ActivationPlan:
    """The planner's plan for ``model`` within ``fraction`` of its no-AC activation bytes.

    Rank 0 (the only process when not distributed) profiles and plans; the plan, or the error, is
    broadcast, so every rank applies the same plan (timings differ between ranks, and so would plans)
    or raises the same error instead of waiting for the others.
    """
    if shape is None and sample is None:
        raise ValueError(
            "Policy budget:F plans on a sample batch, but fsdp_ac.accelerate.prepare was given no "
            "DataLoader to take one from (Trainer and enable() prepare the model alone). Set "
            "FSDP_AC_SAMPLE_SHAPE (or fsdp_ac_sample_shape in the config file) to the shape of a "
            "training batch, e.g. 4,1024 for 4 sequences of 1024 tokens, or pass the training "
            "DataLoader to the same prepare call."
        )
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    outcome: tuple[str, str, int] | None = None
    failure: BaseException | None = None
    if not distributed or dist.get_rank() == 0:
        try:
            outcome = ("plan", _measured_plan(model, blocks, fraction, shape, sample).to_json(), 0)
        except BudgetError as error:
            outcome, failure = ("budget", str(error), error.smallest), error
        except Exception as error:  # any failure: the other ranks must not wait for a plan forever
            outcome, failure = ("error", f"{type(error).__name__}: {error}", 0), error
    if distributed:
        box: list[Any] = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if failure is not None:
        raise failure
    assert outcome is not None
    kind, text, smallest = outcome
    if kind == "budget":
        raise BudgetError(text, smallest)
    if kind == "error":
        raise RuntimeError(f"Rank 0 could not plan policy budget:{fraction:g}: {text}")
    return ActivationPlan.from_json(text)


def _measured_plan(
    model: nn.Module, blocks: ModulePolicy, fraction: float, shape: tuple[int, ...] | None, sample: Any
) -> ActivationPlan:
    """Profiles one training step of ``model`` on the sample batch and plans for ``fraction``."""
    if shape is not None:
        batch = _random_batch(model, shape)
    elif isinstance(sample, torch.utils.data.DataLoader):
        batch = _first_batch(sample)
    else:
        batch = sample
    workload = _sample_workload(model, blocks, batch)
    with _state_kept(model):
        measured = profile(workload, strategies=())
    try:
        result = plan_for_budget(measured, fraction)
    except BudgetError as error:
        least = math.ceil(1000 * error.smallest / measured.no_ac_bytes) / 1000
        raise BudgetError(
            f"Policy budget:{fraction:g} is below what any plan needs on a batch of {workload.description}: "
            f"{error} Set FSDP_AC_POLICY (or fsdp_ac_policy) to budget:{least:g} or more.",
            error.smallest,
        ) from None
    logger.info(
        "fsdp_ac memory plan for budget:%g on %s:\n%s", fraction, workload.description, result.table()
    )
    return result.to_activation_plan()


def _first_batch(loader: torch.utils.data.DataLoader[Any]) -> Any:
    """The first batch ``loader`` yields, read from a fresh iterator without changing what it yields next.

    A fresh iterator draws its seeds (the shuffling order, the workers' seeds) from torch's global
    generator, or from the loader's or its sampler's own; all of them, and Python's, are restored.
    """
    owners = (loader, loader.sampler, getattr(loader.batch_sampler, "sampler", None))
    generators = {
        id(g): g for g in (getattr(o, "generator", None) for o in owners) if isinstance(g, torch.Generator)
    }
    states = [(generator, generator.get_state()) for generator in generators.values()]
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            iterator = iter(loader)
            batch = next(iterator, None)
            del iterator
        finally:
            random.setstate(python_state)
            for generator, state in states:
                generator.set_state(state)
    if batch is None:
        raise ValueError(
            "Policy budget:F plans on the first batch of the DataLoader given to prepare, but it yields "
            "none. Set FSDP_AC_SAMPLE_SHAPE (or fsdp_ac_sample_shape) to the shape of a training batch."
        )
    return batch


def _random_batch(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """Random inputs of ``shape`` for ``model``, seeded, drawn without touching the global generator.

    Token ids below the vocabulary size of the model's first embedding; without one, normal floats of
    the parameters' dtype.
    """
    generator = torch.Generator().manual_seed(0)
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is not None:
        return torch.randint(0, embedding.num_embeddings, shape, generator=generator)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.randn(shape, generator=generator, dtype=dtype)


def _sample_workload(model: nn.Module, blocks: ModulePolicy, batch: Any) -> Workload:
    """The training step the planner measures: ``model`` on ``batch``, on the model's device.

    A batch is a tensor (the input), a mapping (keyword arguments; ``input_ids`` or its first tensor is
    the input) or a sequence whose first item is the input (the rest, targets, are left out).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(batch, torch.Tensor):
        key, inputs, others = None, batch, {}
    elif isinstance(batch, Mapping) and any(isinstance(v, torch.Tensor) for v in batch.values()):
        key = (
            "input_ids"
            if "input_ids" in batch
            else next(k for k, v in batch.items() if isinstance(v, torch.Tensor))
        )
        inputs, others = batch[key], {k: v for k, v in batch.items() if k != key}
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        key, inputs, others = None, batch[0], {}
    else:
        raise ValueError(
            f"Policy budget:F plans on a sample batch, but the DataLoader's first batch is a "
            f"{type(batch).__name__}, not a tensor, a mapping of tensors or a sequence starting with one. "
            "Set FSDP_AC_SAMPLE_SHAPE (or fsdp_ac_sample_shape) to the shape of a training batch."
        )
    accepted = inspect.signature(model.forward).parameters
    extra = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in others.items()}
    if "use_cache" in accepted and "use_cache" not in extra:
        extra["use_cache"] = False  # as checkpointed Hugging Face models train (fsdp_ac/apply.py)
    labels = "labels" in accepted and "labels" not in extra and not inputs.is_floating_point()
    where = f"shape {tuple(inputs.shape)}" + (f" ({key})" if key else "")
    return Workload(model, blocks, inputs.to(device), _SampleLoss(key, extra, labels), where)


@dataclasses.dataclass(frozen=True)
class _SampleLoss:
    """``loss(model, inputs)`` for the profile: the model's own loss, else the sum of its output.

    A Hugging Face causal LM gets ``labels=input_ids`` (its loss is then next-token cross-entropy).
    Other models' losses need targets the planner does not know; the sum of the output runs the same
    backward through the blocks, which is what the plan is about.
    """

    key: str | None
    """The keyword of the input, None to pass it first."""
    others: Mapping[str, Any]
    """More keyword arguments: the rest of the batch."""
    labels: bool
    """Whether to pass ``labels=inputs``."""

    def __call__(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        kwargs = {**self.others, **({"labels": inputs} if self.labels else {})}
        output = model(**{self.key: inputs}, **kwargs) if self.key else model(inputs, **kwargs)
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            return loss
        first = getattr(output, "logits", output)
        if isinstance(first, Mapping):
            first = next((v for v in first.values() if isinstance(v, torch.Tensor)), None)
        elif isinstance(first, (list, tuple)):
            first = next((v for v in first if isinstance(v, torch.Tensor)), None)
        if not isinstance(first, torch.Tensor):
            raise ValueError(
                f"Policy budget:F runs {type(model).__name__} on a sample batch, but its output "
                f"({type(output).__name__}) holds no tensor to call backward on."
            )
        return first.float().sum()


@contextlib.contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Restores what profiling changes in ``model`` and the process.

    Buffers (BatchNorm statistics), gradients and the random state (dropout) are put back, so that
    training starts as it would have without the profile.
    """
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    grads = [(param, param.grad) for param in model.parameters()]
    devices = sorted(
        {b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"}
        | {p.device.index or 0 for p, _ in grads if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for param, grad in grads:
                param.grad = grad


# --- applying ------------------------------------------------------------------------------------


def _refuse_unrelated_processes(accelerator: Any) -> None:
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {raw!r}.")
    launched = int(raw)
    if launched > 1 and accelerator.num_processes == 1:
        raise ValueError(
            f"accelerate launch started {launched} processes, but Accelerate runs each of them as a "
            "separate single-process job (it found no GPU and was not asked to use the CPU), so each "
            "would train its own model. Use Accelerator(cpu=True) or set ACCELERATE_USE_CPU=true for "
            "multi-CPU DDP on gloo."
        )


def _refuse_unsupported(accelerator: Any) -> None:
    from accelerate.utils import DistributedType

    supported = {DistributedType.FSDP, DistributedType.NO} | {
        kind for kind in DistributedType if kind.name.startswith("MULTI_")
    }
    if accelerator.distributed_type not in supported:
        raise ValueError(
            f"fsdp_ac.accelerate.prepare checkpoints FSDP, DDP and one-process runs; this one is "
            f"{accelerator.distributed_type}. Use that engine's own activation checkpointing and "
            "accelerator.prepare, or unset fsdp_ac's settings (FSDP_AC_*)."
        )


@contextlib.contextmanager
def _accelerate_checkpointing_off(plugin: Any) -> Iterator[None]:
    """Switches Accelerate's own activation checkpointing off for the duration of a ``prepare``."""
    if plugin is None:
        yield
        return
    saved = plugin_checkpointing(plugin)
    set_plugin_checkpointing(plugin, False, False)
    try:
        yield
    finally:
        set_plugin_checkpointing(plugin, *saved)


def _apply(plan: ActivationPlan, prepared: nn.Module, main: bool) -> None:
    """Applies ``plan`` inside the parallel wrappers of ``prepared``."""
    model = _inside_wrappers(prepared)
    plan.apply(model)
    if main:
        logger.info("fsdp_ac activation checkpointing:\n%s", plan.table(model))


def _inside_wrappers(model: nn.Module) -> nn.Module:
    """The model inside DDP and ``torch.compile`` wrappers.

    FSDP1 and FSDP2 units stay: plans see through them, and the alignment check needs them.
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif (compiled := compiled_original(model)) is not None:
            model = compiled
        else:
            return model


# --- enable() / disable(): every Accelerator.prepare through fsdp_ac ----------------------------------
# Appended section (issue #12); it calls only the public functions above.

__all__ += ["disable", "enable"]

_ROUTED_METHODS = tuple(ROUTED_ACCELERATOR_METHODS)
"""The ``Accelerator`` methods :func:`enable` routes, as ``fsdp_ac._compat`` lists them."""


def enable() -> None:
    """Routes every ``Accelerator.prepare`` of the process through :func:`prepare`.

    Scripts that never call ``accelerator.prepare`` themselves (Hugging Face ``Trainer``, TRL's
    trainers, any library built on Accelerate) get fsdp_ac's activation checkpointing from the same
    settings as :func:`prepare`: Accelerate's ``fsdp_activation_checkpointing`` flag (or
    ``TrainingArguments(fsdp_config={"activation_checkpointing": True})``), the ``fsdp_ac_*`` keys and
    the ``FSDP_AC_*`` variables. Accelerate's own checkpointing is switched off for each call, and
    fsdp_ac checkpoints the blocks after Accelerate has sharded or replicated the model.
    ``python -m fsdp_ac.run train.py`` calls this before it runs an unmodified script.

    ``Accelerator.prepare`` and ``Accelerator.prepare_model`` are replaced on the class, so every
    accelerator, made before or after the call, is routed; ``prepare_model(..., evaluation_mode=True)``
    (no training, nothing to checkpoint) is left to Accelerate. A second call changes nothing.

    Raises:
        ImportError: ``accelerate`` is not installed.
        RuntimeError: The installed Accelerate's internals differ from those this routing was checked
            against; the message names its version and what differs.

    Example:
        >>> import fsdp_ac.accelerate
        >>> fsdp_ac.accelerate.enable()
        >>> trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        >>> trainer.train()  # its accelerator.prepare checkpoints with fsdp_ac
    """
    from accelerate import Accelerator

    _check_accelerate_internals()
    for name in _ROUTED_METHODS:
        method = Accelerator.__dict__[name]
        if not _is_route(method):
            setattr(Accelerator, name, _route(name, method))


def disable() -> None:
    """Undoes :func:`enable`: ``Accelerator.prepare`` and ``prepare_model`` are Accelerate's again.

    Models already prepared keep their checkpointing. Does nothing when routing is off.

    Raises:
        RuntimeError: Something replaced a routed method after :func:`enable` (another library's
            patch); restoring Accelerate's method would drop that patch too, so nothing is changed.
    """
    from accelerate import Accelerator

    current = {name: Accelerator.__dict__[name] for name in _ROUTED_METHODS}
    routed = [name for name, method in current.items() if _is_route(method)]
    if not routed:
        return
    for name, method in current.items():
        if name not in routed:
            raise RuntimeError(
                f"Accelerator.{name} was replaced after fsdp_ac.accelerate.enable() by {method!r}; "
                "disable() would drop that replacement too. Undo it first, then call disable()."
            )
    for name in routed:
        setattr(Accelerator, name, current[name].__wrapped__)


def _is_route(method: object) -> bool:
    return getattr(method, "_fsdp_ac_route", False) is True


def _route(name: str, original: Any) -> Any:
    """The routed ``Accelerator.<name>``: :func:`prepare`, unless called on behalf of :func:`prepare`.

    :func:`prepare` calls ``accelerator.prepare``, which calls ``prepare_model``: those nested calls
    reach Accelerate's own methods, so a model is prepared and checkpointed once, also when a script
    calls :func:`prepare` itself while routing is on.
    """

    @functools.wraps(original)
    def routed(self: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "prepare":
            objects, placement = args, kwargs.get("device_placement")
            evaluation = False
        else:
            model, device, evaluation = _prepare_model_arguments(*args, **kwargs)
            objects, placement = (model,), (None if device is None else [device])
        if evaluation or _inside_prepare():
            return original(self, *args, **kwargs)
        return prepare(self, *objects, device_placement=placement)

    routed._fsdp_ac_route = True  # type: ignore[attr-defined]
    return routed


def _prepare_model_arguments(
    model: nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False
) -> tuple[nn.Module, bool | None, bool]:
    """``Accelerator.prepare_model``'s arguments, bound as Accelerate binds them."""
    return model, device_placement, evaluation_mode


def _inside_prepare() -> bool:
    """Whether :func:`prepare` or one of Accelerate's own routed methods is running in this thread.

    Read from the call stack rather than kept in a flag, so no state outlives a call.
    """
    import sys
    import types

    from accelerate import Accelerator

    codes = {prepare.__code__}
    for name in _ROUTED_METHODS:
        method = Accelerator.__dict__[name]
        codes.add(getattr(method, "__wrapped__", method).__code__)
    frame: types.FrameType | None = sys._getframe(2)  # the routed method's caller
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _check_accelerate_internals() -> None:
    """Refuses an Accelerate whose checkpointing entry points are not where :func:`enable` routes them."""
    import accelerate

    differences = accelerate_differences()
    if differences:
        raise RuntimeError(
            f"fsdp_ac.accelerate.enable() cannot route Accelerate {accelerate.__version__}: "
            f"{'; '.join(differences)} (checked against Accelerate {' and '.join(CHECKED_ACCELERATE)}). "
            f"Install accelerate=={CHECKED_ACCELERATE[-1]}, or call "
            "fsdp_ac.accelerate.prepare(accelerator, ...) in place of accelerator.prepare."
        )
