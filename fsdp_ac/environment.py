"""Every setting fsdp_ac reads from the environment, in one place.

=====================  ==========================================================================
Variable               Meaning
=====================  ==========================================================================
``FSDP_AC_BACKEND``    Process-group backend for the demo and the distributed suite (``gloo`` or
                       ``nccl``). Default: ``nccl`` when CUDA has at least one GPU per local rank,
                       else ``gloo``.
``FSDP_AC_TIMEOUT_S``  Seconds any collective may wait before failing (default 120), so that a hung
                       or desynchronised rank fails the run instead of hanging it.
``FSDP_AC_NPROC``      Ranks each multi-rank test of the suite starts (default 2);
                       ``make test-distributed NPROC=N`` sets it.
=====================  ==========================================================================

Settings of the Hugging Face Accelerate integration (:mod:`fsdp_ac.accelerate`, see
``docs/accelerate.md``). Each one may also be given in the file named by ``FSDP_AC_CONFIG_FILE``, as
the key ``fsdp_ac_<name>`` in its ``fsdp_config`` section; the variable wins over the file.

=============================  ==================================================================
Variable                       Meaning
=============================  ==================================================================
``FSDP_AC_CONFIG_FILE``        An Accelerate config file (YAML or JSON) to read ``fsdp_ac_*`` keys
                               from, usually the one given to ``accelerate launch --config_file``.
``FSDP_AC_POLICY``             Which blocks to checkpoint: ``all``, ``every:N``, ``first:K``,
                               ``last:K``, ``budget:F`` (0 < F <= 1), or ``none``. Setting it turns
                               activation checkpointing on (``none`` turns it off).
``FSDP_AC_STRATEGY``           What each chosen block gets: ``full``, ``selective``,
                               ``selective:<preset>``, ``offload`` or ``full+offload``. Setting it
                               turns activation checkpointing on.
``FSDP_AC_PLAN``               Path of an ``ActivationPlan`` JSON file to apply instead of policy
                               and strategy (what a memory planner writes). Turns it on.
``FSDP_AC_BLOCKS``             Comma-separated block class names, instead of Accelerate's
                               ``fsdp_transformer_layer_cls_to_wrap`` or ``_no_split_modules``.
``FSDP_AC_OFFLOAD``            Offload the inputs of checkpointed blocks to CPU memory (``true`` /
                               ``false``); default: Accelerate's ``activation_checkpointing_offload``.
``FSDP_AC_OFFLOAD_MIN_BYTES``  Saved tensors smaller than this stay on their device (default 1024).
``FSDP_AC_PIN_MEMORY``         Offload into page-locked memory (default ``true``).
=============================  ==================================================================

Read, not owned: ``ACCELERATE_USE_FSDP`` (set by ``accelerate launch`` for an FSDP config), to tell
when Accelerate dropped FSDP, and ``WORLD_SIZE`` (set by torchrun), to tell when the processes of one
launch run unaware of each other.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch

__all__ = [
    "AC_SETTING_PARSERS",
    "ac_blocks",
    "ac_config_file",
    "ac_offload",
    "ac_offload_min_bytes",
    "ac_pin_memory",
    "ac_plan",
    "ac_policy",
    "ac_strategy",
    "accelerate_fsdp_requested",
    "collective_timeout",
    "launched_world_size",
    "select_backend",
    "suite_nproc",
]

_T = TypeVar("_T")

_BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_NPROC = 2


def select_backend(local_world_size: int) -> str:
    """Returns the process-group backend to use for ``local_world_size`` ranks on this host.

    Args:
        local_world_size: Ranks started on this host.

    Raises:
        ValueError: ``FSDP_AC_BACKEND`` names an unknown backend, or asks for ``nccl`` without
            enough GPUs.
    """
    requested = os.environ.get("FSDP_AC_BACKEND", "").strip().lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not requested:
        return "nccl" if gpus >= local_world_size else "gloo"
    if requested not in _BACKENDS:
        raise ValueError(f"FSDP_AC_BACKEND={requested!r} is not one of {_BACKENDS}; unset it or pick one.")
    if requested == "nccl" and gpus < local_world_size:
        raise ValueError(
            f"FSDP_AC_BACKEND=nccl needs {local_world_size} GPUs on this host, found {gpus}; "
            "use FSDP_AC_BACKEND=gloo or fewer ranks."
        )
    return requested


def collective_timeout() -> timedelta:
    """Returns the timeout for process groups, from ``FSDP_AC_TIMEOUT_S`` (default 120 s).

    Raises:
        ValueError: The variable is not a positive number.
    """
    raw = os.environ.get("FSDP_AC_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"FSDP_AC_TIMEOUT_S must be a positive number of seconds, got {raw!r}.")
    return timedelta(seconds=seconds)


def suite_nproc() -> int:
    """Returns how many ranks each multi-rank test starts, from ``FSDP_AC_NPROC`` (default 2).

    Raises:
        ValueError: The variable is not a positive integer.

    Example:
        >>> suite_nproc()  # with FSDP_AC_NPROC unset
        2
    """
    raw = os.environ.get("FSDP_AC_NPROC", str(DEFAULT_NPROC)).strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"FSDP_AC_NPROC must be a positive integer (ranks per test), got {raw!r}.")
    return int(raw)


# --- the Accelerate integration ------------------------------------------------------------------
# Each parser takes a value from the environment (a string) or from a config file (a string, bool,
# number or list) and the place it came from, which every error names.

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_POLICY_KINDS = ("every", "first", "last", "budget")


def _parse_bool(raw: object, source: str) -> bool:
    """Parses ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``, a YAML bool).

    Raises:
        ValueError: ``raw`` is none of these; the message names ``source``.
    """
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{source} must be true or false, got {raw!r}.")


def _parse_byte_count(raw: object, source: str) -> int:
    """Parses a non-negative integer number of bytes.

    Raises:
        ValueError: ``raw`` is not a non-negative integer; the message names ``source``.
    """
    text = str(raw).strip()
    if isinstance(raw, bool) or not text.isdigit():
        raise ValueError(f"{source} must be a non-negative integer number of bytes, got {raw!r}.")
    return int(text)


def _parse_class_names(raw: object, source: str) -> tuple[str, ...]:
    """Parses block class names: a comma-separated string or a list of strings.

    Raises:
        ValueError: No name is given; the message names ``source``.
    """
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    names = tuple(str(item).strip() for item in items if str(item).strip())
    if not names:
        raise ValueError(f"{source} must name at least one block class, e.g. LlamaDecoderLayer; got {raw!r}.")
    return names


def _parse_ac_policy(raw: object, source: str) -> str:
    """Parses which blocks to checkpoint; returns it normalised (``every:2``, ``budget:0.5``, ...).

    ``all`` and ``none``; ``every:N``, ``first:K`` and ``last:K`` with positive integers;
    ``budget:F`` with ``0 < F <= 1``.

    Raises:
        ValueError: ``raw`` is none of these; the message names ``source`` and the forms.
    """
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


def _parse_ac_strategy(raw: object, source: str) -> str:
    """Parses what each chosen block gets: an :class:`~fsdp_ac.ActivationPlan` strategy but ``none``.

    Raises:
        ValueError: ``raw`` is not such a strategy; the message names ``source`` and lists them.
    """
    from fsdp_ac.plan import STRATEGIES  # lazily: this module stays free of fsdp_ac imports

    text = str(raw).strip().lower().replace(" ", "")
    allowed = [strategy for strategy in STRATEGIES if strategy != "none"]
    if text not in allowed:
        raise ValueError(f"{source} must be one of {', '.join(allowed)}; got {raw!r}.")
    return text


def _parse_existing_file(raw: object, source: str) -> Path:
    """Parses the path of a file that must exist.

    Raises:
        ValueError: There is no such file; the message names ``source``.
    """
    path = Path(str(raw)).expanduser()
    if not path.is_file():
        raise ValueError(f"{source} names {str(raw)!r}, which is not a file.")
    return path


AC_SETTING_PARSERS: dict[str, Callable[[object, str], object]] = {
    "policy": _parse_ac_policy,
    "strategy": _parse_ac_strategy,
    "plan": _parse_existing_file,
    "blocks": _parse_class_names,
    "offload": _parse_bool,
    "offload_min_bytes": _parse_byte_count,
    "pin_memory": _parse_bool,
}
"""The settings of the Accelerate integration: ``FSDP_AC_<NAME>`` in the environment,
``fsdp_ac_<name>`` in a config file, each read by its parser."""


def _read(variable: str, parse: Callable[[object, str], _T]) -> _T | None:
    raw = os.environ.get(variable, "").strip()
    return parse(raw, variable) if raw else None


def ac_config_file() -> Path | None:
    """Returns the config file to read ``fsdp_ac_*`` settings from (``FSDP_AC_CONFIG_FILE``), if set.

    Raises:
        ValueError: The variable names no file.
    """
    return _read("FSDP_AC_CONFIG_FILE", _parse_existing_file)


def ac_policy() -> str | None:
    """Returns ``FSDP_AC_POLICY`` normalised (``all``, ``every:2``, ``budget:0.5``...), or None when unset.

    Raises:
        ValueError: The value is not a policy.
    """
    return _read("FSDP_AC_POLICY", _parse_ac_policy)


def ac_strategy() -> str | None:
    """Returns ``FSDP_AC_STRATEGY`` (an ``ActivationPlan`` strategy but ``none``), or None when unset.

    Raises:
        ValueError: The value is not a strategy.
    """
    return _read("FSDP_AC_STRATEGY", _parse_ac_strategy)


def ac_plan() -> Path | None:
    """Returns the activation plan file ``FSDP_AC_PLAN``, or None when unset.

    Raises:
        ValueError: The variable names no file.
    """
    return _read("FSDP_AC_PLAN", _parse_existing_file)


def ac_blocks() -> tuple[str, ...] | None:
    """Returns the block class names of ``FSDP_AC_BLOCKS`` (comma-separated), or None when unset.

    Raises:
        ValueError: The value names no class.
    """
    return _read("FSDP_AC_BLOCKS", _parse_class_names)


def ac_offload() -> bool | None:
    """Returns ``FSDP_AC_OFFLOAD`` as a bool, or None when unset.

    Raises:
        ValueError: The value is not a boolean.
    """
    return _read("FSDP_AC_OFFLOAD", _parse_bool)


def ac_offload_min_bytes() -> int | None:
    """Returns ``FSDP_AC_OFFLOAD_MIN_BYTES``, or None when unset.

    Raises:
        ValueError: The value is not a non-negative integer.
    """
    return _read("FSDP_AC_OFFLOAD_MIN_BYTES", _parse_byte_count)


def ac_pin_memory() -> bool | None:
    """Returns ``FSDP_AC_PIN_MEMORY`` as a bool, or None when unset.

    Raises:
        ValueError: The value is not a boolean.
    """
    return _read("FSDP_AC_PIN_MEMORY", _parse_bool)


def accelerate_fsdp_requested() -> bool:
    """True when ``accelerate launch`` was given an FSDP config (it sets ``ACCELERATE_USE_FSDP``).

    Raises:
        ValueError: The variable is set to something other than a boolean.
    """
    return bool(_read("ACCELERATE_USE_FSDP", _parse_bool))


def launched_world_size() -> int:
    """Returns the number of processes torchrun started (``WORLD_SIZE``), 1 when unset.

    Raises:
        ValueError: The variable is not a positive integer.
    """
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {raw!r}.")
    return int(raw)
