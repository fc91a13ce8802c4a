"""The test suite's settings from the environment (the demo reads the first two as well).

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

The settings of the package itself (the Accelerate integration's ``FSDP_AC_*``) are read by
:mod:`fsdp_ac.accelerate`; ``docs/environment.md`` lists them all.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

__all__ = ["collective_timeout", "select_backend", "suite_nproc"]

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
