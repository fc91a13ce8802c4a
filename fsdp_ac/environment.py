"""Every setting fsdp_ac reads from the environment, in one place.

=====================  ==========================================================================
Variable               Meaning
=====================  ==========================================================================
``FSDP_AC_BACKEND``    Process-group backend for the demo and the distributed suite (``gloo`` or
                       ``nccl``). Default: ``nccl`` when CUDA has at least one GPU per local rank,
                       else ``gloo``.
``FSDP_AC_TIMEOUT_S``  Seconds any collective may wait before failing (default 120), so that a hung
                       or desynchronised rank fails the run instead of hanging it.
=====================  ==========================================================================
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

__all__ = ["collective_timeout", "select_backend"]

_BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 120.0


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
