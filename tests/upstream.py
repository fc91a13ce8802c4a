"""Other libraries' behaviour shown beside fsdp_ac's: recorded with the release, never asserted strictly.

A test that reproduces a defect of torch, Accelerate or another library states it through
:func:`shows` or :func:`shows_error`. While the installed release has the defect, nothing happens.
When a release behaves otherwise (upstream fixed it), the test warns with :class:`UpstreamChanged`,
naming the library, its version and the claim, and goes on: upstream's fix never turns the suite red.
Assertions about fsdp_ac stay strict (docs/testing.md, "Other libraries' behaviour").
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class UpstreamChanged(UserWarning):
    """A library no longer behaves as a test recorded it (usually: it fixed the defect shown)."""


def release(library: str) -> str:
    """The installed release of ``library`` (its distribution name, e.g. ``torch``, ``accelerate``)."""
    return importlib.metadata.version(library)


def shows(library: str, claim: str, observed: bool) -> bool:
    """Records whether ``library`` still shows ``claim``; warns when it does not. Returns ``observed``."""
    if not observed:
        warnings.warn(UpstreamChanged(f"{library} {release(library)} no longer shows: {claim}"), stacklevel=2)
    return observed


@dataclass
class Raised:
    """What :func:`shows_error` caught: the error, or None when the library no longer raises."""

    value: BaseException | None = None


@contextmanager
def shows_error(library: str, claim: str, error: type[BaseException], match: str = "") -> Iterator[Raised]:
    """Runs the block expecting ``library`` to raise ``error`` (its message matching ``match``).

    The expected error is caught; any other error propagates. When nothing is raised, warns as
    :func:`shows` does.
    """
    raised = Raised()
    try:
        yield raised
    except error as caught:
        if not re.search(match, str(caught)):
            raise
        raised.value = caught
    shows(library, claim, raised.value is not None)
