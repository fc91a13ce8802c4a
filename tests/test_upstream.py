"""The recorder of other libraries' behaviour: silent while a defect is seen, a warning once it is not."""

from __future__ import annotations

import re
import warnings

import pytest
from upstream import UpstreamChanged, release, shows, shows_error


def test_a_behaviour_still_seen_passes_silently() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert shows("torch", "a defect", True) is True
        with shows_error("torch", "an error", ValueError, "bad") as raised:
            raise ValueError("a bad input")
    assert isinstance(raised.value, ValueError)


def test_a_fixed_behaviour_warns_with_the_release_and_passes() -> None:
    expected = f"^torch {re.escape(release('torch'))} no longer shows: a defect$"
    with pytest.warns(UpstreamChanged, match=expected):
        assert shows("torch", "a defect", False) is False
    with pytest.warns(UpstreamChanged, match=r"accelerate .* no longer shows: an error"):
        with shows_error("accelerate", "an error", ValueError) as raised:
            pass
    assert raised.value is None


def test_other_errors_propagate() -> None:
    with pytest.raises(TypeError), shows_error("torch", "a ValueError", ValueError):
        raise TypeError("not the recorded failure")
    with pytest.raises(ValueError, match="other"), shows_error("torch", "a ValueError", ValueError, "bad"):
        raise ValueError("an other message")
