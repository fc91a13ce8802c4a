"""What fsdp_ac tells the user: one line from rank 0 when it changes a model, warnings at their call.

The line goes to the ``fsdp_ac`` logger where logging shows its INFO records, else to standard error,
so it is seen without configuring logging; ``FSDP_AC_VERBOSITY=warning`` silences it
(``docs/environment.md``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import torch.distributed as dist

__all__ = [
    "VERBOSITY_VARIABLE",
    "notice",
    "origin",
    "said_origin",
    "silenced",
    "user_stacklevel",
    "verbosity",
]

VERBOSITY_VARIABLE = "FSDP_AC_VERBOSITY"
_LEVELS = ("info", "warning")
_PACKAGE = str(Path(__file__).resolve().parent) + os.sep
_ORIGIN: ContextVar[str | None] = ContextVar("fsdp_ac_origin", default=None)
_SILENCED: ContextVar[bool] = ContextVar("fsdp_ac_silenced", default=False)


def verbosity() -> str:
    """``info`` (the default: the account lines) or ``warning`` (warnings only), from the environment.

    Raises:
        ValueError: ``FSDP_AC_VERBOSITY`` has another value.
    """
    raw = os.environ.get(VERBOSITY_VARIABLE, "").strip().lower() or "info"
    if raw not in _LEVELS:
        raise ValueError(
            f"{VERBOSITY_VARIABLE} must be info (the default: one line when fsdp_ac changes a model) or "
            f"warning (that line silenced), got {raw!r}."
        )
    return raw


def notice(line: str) -> None:
    """Writes ``fsdp_ac: <line>`` on rank 0, unless ``FSDP_AC_VERBOSITY=warning``."""
    if verbosity() != "info" or _SILENCED.get() or _rank() != 0:
        return
    logger = logging.getLogger("fsdp_ac")
    if logger.hasHandlers() and logger.isEnabledFor(logging.INFO):
        logger.info("fsdp_ac: %s", line)
    else:
        print(f"fsdp_ac: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def origin(text: str) -> Iterator[None]:
    """Within the block, the account of a changed model ends with ``text`` (the settings it applies)."""
    token = _ORIGIN.set(text)
    try:
        yield
    finally:
        _ORIGIN.reset(token)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Within the block, no account: for models fsdp_ac changes only to measure them (copies)."""
    token = _SILENCED.set(True)
    try:
        yield
    finally:
        _SILENCED.reset(token)


def said_origin() -> str | None:
    """The text :func:`origin` set, if any."""
    return _ORIGIN.get()


def user_stacklevel() -> int:
    """The ``stacklevel`` at which the caller's warning points at the first frame outside fsdp_ac."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    raw = os.environ.get("RANK", "0").strip()
    return int(raw) if raw.isdigit() else 0
